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
    """The calls the driver makes on its tracker, in run order: ``on_experts`` (stage-1 experts
    trained now), ``on_real_examples`` (per stage), ``on_stage_start`` / ``on_stage_end`` (per
    stage) and, from :func:`pdd_ray.pipeline.run`, ``on_report``."""

    def on_experts(self, key: str, summaries: list[dict]) -> None:
        """The stage-1 experts trained now (key, per-expert accuracy)."""

    def on_real_examples(self, k: int, n: int) -> None:
        """Stage k uses ``n`` real training examples (forgetting-score discarding)."""

    def on_stage_start(self, k: int, prepared, experts_key: str | None) -> StageSink:
        """Stage k begins, matching the expert trajectories under ``experts_key`` (None: fresh
        networks): where its metrics and images go."""

    def on_stage_end(self, k: int, outcome, seconds: float, resumed_from_record: bool, health) -> None:
        """Stage k ended: its outcome, time, and whether it kept its initialisation or diverged
        (``health``, :class:`pdd_ray.distill.health.StageHealth`)."""

    def on_report(self, report) -> None:
        """The run's evaluation report (:class:`pdd_ray.pipeline.RunReport`)."""
