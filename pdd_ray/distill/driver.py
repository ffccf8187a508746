"""The PDD driver: stages in order, each a Ray Train run, with transitions in between.

    experts_1 = stage-1 experts (Ray actors, trajectory store)
    for k in 1..P:
        S_k = TorchTrainer(stage_worker).fit()      # S_<k frozen, best-on-validation kept
        if k < P: experts_{k+1} = transition(experts_k, S_<=k, α_k)   # Ray actors, parallel
    artifact + progressive evaluation + baselines

Idempotent: a finished stage is recorded in ``stage_k/manifest.json`` (with its images in
``stage_k/stage.npz``) and skipped on re-run; an unfinished one resumes inside from its
latest Ray Train checkpoint; experts already in the store are never retrained.

The parts live beside this module: the run's identity (:mod:`.identity`), stage records
(:mod:`.records`), one stage on Ray Train (:mod:`.launch`, with its live progress in
:mod:`.stage_progress` and the worker loop in :mod:`.stage`) and transitions
(:mod:`.transition`); this module is only the outer loop and the artifact.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from pdd_ray.config import PddConfig, dump_config
from pdd_ray.distill.artifact import DataSpace, write_artifact
from pdd_ray.distill.callbacks import RunCallbacks
from pdd_ray.distill.health import StageHealth, stage_health
from pdd_ray.distill.identity import run_dir, run_key, run_lock
from pdd_ray.distill.launch import run_stage
from pdd_ray.distill.methods import BaseMethod, method_class, method_settings
from pdd_ray.distill.records import StageOutcome, load_stage, record_real_examples, save_stage
from pdd_ray.distill.transition import real_examples, run_transition
from pdd_ray.evaluation import StageSet, recipe_from_config
from pdd_ray.experts.produce import stage1_experts
from pdd_ray.prepare import Prepared
from pdd_ray.progress import log as progress_log
from pdd_ray.progress import phase
from pdd_ray.storage import Folder


@dataclass
class DistillResult:
    """Where the run lives and what it produced."""

    directory: Folder
    artifact: Folder
    stages: list[StageSet]
    outcomes: list[StageOutcome]
    expert_keys: list[str | None]
    seconds: dict[str, float]
    health: list[StageHealth] = field(default_factory=list)  # per stage: kept the initialisation? diverged?


def distill(cfg: PddConfig, prepared: Prepared, progress: bool = True, on_stage=None,
            tracker: RunCallbacks | None = None) -> DistillResult:
    """Run (or resume) every stage of ``cfg`` and write the artifact, holding :func:`run_lock`.

    ``on_stage(k, outcome)`` runs after each stage (a Tune trial reports there); ``tracker``
    (:class:`pdd_ray.distill.callbacks.RunCallbacks`, e.g. :class:`pdd_ray.tracking.RunTracker`)
    is told what happens, in order; None tracks nothing.
    """
    with run_lock(cfg):
        return _distill(cfg, prepared, progress, on_stage, tracker)


def _first_conditioning(cfg: PddConfig, prepared: Prepared, progress: bool, tracker) -> str | None:
    """Stage 1's conditioning networks: the stage-1 experts' key when the method matches
    trajectories, else None (fresh networks); discarding needs the experts' forgetting counts."""
    method = method_class(cfg.distill.method)
    if method.needs_trajectories:
        with phase("experts"):
            key, summaries = stage1_experts(cfg, prepared, progress=progress)
        if tracker is not None:
            tracker.on_experts(key, summaries)
        return key
    if cfg.distill.discard_fraction > 0:  # the forgetting counts come from stage-1 experts' real-data training
        with phase("experts"):
            stage1_experts(cfg, prepared, progress=progress)
    return None


def _stage_outcome(cfg: PddConfig, prepared: Prepared, directory: Folder, k: int, key: str | None,
                   stored: list[StageSet], progress: bool, sink) -> tuple[StageOutcome, bool]:
    """Stage k's outcome: read from its record when it finished earlier, else distilled now and
    recorded. Returns it with whether it came from the record."""
    out = load_stage(directory, k)
    if out is not None:
        progress_log.info("stage %d/%d: finished earlier, read from %s", k, cfg.distill.num_stages,
                          directory / f"stage_{k}")
        return out, True
    with phase(f"stage {k}/{cfg.distill.num_stages}"):
        out = run_stage(cfg, prepared, directory, k, key, stored, progress, sink=sink)
    save_stage(directory, k, out)
    return out, False


@dataclass
class _Run:
    """What the outer loop accumulates, stage by stage."""

    keys: list[str | None]
    seconds: dict[str, float]
    stages: list[StageSet] = field(default_factory=list)  # decoded training images: evaluation, transitions, artifact
    stored: list[StageSet] = field(default_factory=list)  # what each stage optimised: later stages freeze these
    outcomes: list[StageOutcome] = field(default_factory=list)
    health: list[StageHealth] = field(default_factory=list)


def _distill(cfg: PddConfig, prepared: Prepared, progress: bool, on_stage, tracker) -> DistillResult:
    directory = run_dir(cfg)
    directory.mkdir()
    (directory / "config.yaml").write_text(dump_config(cfg))
    t0 = time.perf_counter()
    key = _first_conditioning(cfg, prepared, progress, tracker)
    run = _Run(keys=[key], seconds={"experts": time.perf_counter() - t0})
    _record_real_examples(prepared, directory, 1, real_examples(cfg, prepared, 1), progress, tracker)
    method = method_class(cfg.distill.method)
    for k in range(1, cfg.distill.num_stages + 1):
        out = _one_stage(cfg, prepared, directory, k, key, run, progress, tracker)
        _add_stage(cfg, prepared, method, k, out, run)
        if on_stage is not None:
            on_stage(k, out)
        if k < cfg.distill.num_stages:
            key = _transition(cfg, prepared, directory, k, key, run, progress, tracker)
    artifact = _write_run_artifact(cfg, prepared, method, directory, run)
    return DistillResult(directory, artifact, run.stages, run.outcomes, run.keys, run.seconds, run.health)


def _record_real_examples(prepared: Prepared, directory: Folder, k: int, n: int, progress: bool, tracker) -> None:
    """Stage k uses ``n`` real training examples: in the run directory and on the tracker."""
    record_real_examples(directory, k, n, prepared.bundle.train_x.shape[0], progress)
    if tracker is not None:
        tracker.on_real_examples(k, n)


def _transition(cfg: PddConfig, prepared: Prepared, directory: Folder, k: int, key: str | None, run: _Run,
                progress: bool, tracker) -> str:
    """The experts of stage k+1 (timed) and the real examples they use; returns their key."""
    t0 = time.perf_counter()
    with phase(f"transition {k}->{k + 1}"):
        key, n = run_transition(cfg, prepared, k, key, run.stages, progress)
        _record_real_examples(prepared, directory, k + 1, n, progress, tracker)
    run.seconds[f"transition_{k}"] = time.perf_counter() - t0
    run.keys.append(key)
    return key


def _one_stage(cfg: PddConfig, prepared: Prepared, directory: Folder, k: int, key: str | None, run: _Run,
               progress: bool, tracker) -> StageOutcome:
    """Stage k's outcome with its time, health check and tracking."""
    t0 = time.perf_counter()
    sink = tracker.on_stage_start(k, prepared, key) if tracker is not None else None
    out, from_record = _stage_outcome(cfg, prepared, directory, k, key, run.stored, progress, sink)
    run.seconds[f"stage_{k}"] = time.perf_counter() - t0  # includes the in-loop validation:
    run.seconds[f"validation_{k}"] = out.validation_seconds
    run.seconds[f"steps_{k}"] = out.step_seconds  # the rest of stage_k: mostly Ray Train's start and stop
    run.health.append(stage_health(k, out.best_iteration, out.best_val_acc, out.val_history,
                                   prepared.bundle.num_classes, cfg.distill.iterations))
    if run.health[-1].warning:
        print(f"pdd-ray: warning: {run.health[-1].warning}", file=sys.stderr, flush=True)
    if tracker is not None:
        tracker.on_stage_end(k, out, run.seconds[f"stage_{k}"], from_record, run.health[-1])
    return out


def _add_stage(cfg: PddConfig, prepared: Prepared, method: type[BaseMethod], k: int, out: StageOutcome,
               run: _Run) -> None:
    """Append stage k as stored (frozen by later stages) and decoded (what everything else trains on)."""
    ev_epochs = cfg.evaluation.epochs_per_stage
    run.outcomes.append(out)
    run.stored.append(StageSet(out.images, out.labels, lr=out.alpha, epochs=ev_epochs, soft_labels=out.soft_labels))
    train_x, train_y = method.decode(method_settings(cfg, prepared.bundle.num_classes, k), out.images, out.labels)
    run.stages.append(StageSet(train_x, train_y, lr=out.alpha, epochs=ev_epochs, soft_labels=out.soft_labels))


def _write_run_artifact(cfg: PddConfig, prepared: Prepared, method: type[BaseMethod], directory: Folder,
                        run: _Run) -> Folder:
    """The run's artifact: the decoded stages with their evaluation recipe and provenance."""
    b = prepared.bundle
    return write_artifact(
        directory / "artifact",
        run.stages,
        prepared.spec,
        DataSpace({"name": b.name, "digest": b.digest, "classes": b.class_names, "shape": list(b.shape)},
                  b.mean, b.std, prepared.zca),
        recipe_from_config(cfg.evaluation, cfg.augment.strategy),
        cfg.evaluation.carry_optimizer_state,
        {"run_key": run_key(cfg), "expert_keys": run.keys, "config": cfg.model_dump(mode="json")},
        decode=method.decode_info(method_settings(cfg, b.num_classes, 1)),
    )
