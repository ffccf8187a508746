"""What the driver tells a tracker, as two small protocols; MLflow (:mod:`pdd_ray.tracking`) is
one implementation, and a run without tracking passes None.

The maths never sees a tracker: stage workers record their metrics and images on the stage's
progress actor, and the driver hands them to a :class:`StageSink` (see
:mod:`pdd_ray.distill.stage_progress`).
"""

from __future__ import annotations

from typing import Protocol


class StageSink(Protocol):
    """Where the driver puts one stage's per-iteration metrics and image grids."""

    def metrics(self, step: int, **values: float) -> None: ...

    def images(self, step: int, images, labels) -> None: ...

    def flush(self) -> None: ...


class RunCallbacks(Protocol):
    """The calls :func:`pdd_ray.distill.driver.distill` makes on its tracker, in run order."""

    def log_expert_summaries(self, key: str, summaries: list[dict]) -> None:
        """The stage-1 experts trained now (key, per-expert accuracy)."""

    def log_real_examples(self, k: int, n: int) -> None:
        """Stage k uses ``n`` real training examples (forgetting-score discarding)."""

    def stage_logger(self, k: int, prepared) -> StageSink:
        """Stage k begins: where its metrics and images go."""

    def log_experts(self, key: str, stage: int) -> None:
        """The expert trajectories (store key) stage ``stage`` matches."""

    def log_stage_health(self, health) -> None:
        """Stage k kept its initialisation or diverged (``pdd_ray.distill.health``)."""

    def on_stage(self, k: int, outcome, seconds: float, resumed_from_record: bool) -> None:
        """Stage k ended: its outcome and time."""
