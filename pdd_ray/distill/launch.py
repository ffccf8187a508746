"""One stage on Ray Train: build the workers' task, fit a Ray Train trainer, read its result.

The per-worker loop itself is :func:`pdd_ray.distill.stage.stage_worker`; this module is the
driver's side of it (initial images, frozen stages, the progress watcher, the final checkpoint
turned into a :class:`StageOutcome`). The fit runs off the main thread so that Ctrl-C stops
it cleanly: :mod:`pdd_ray.distill.fit_thread`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import ray
import torch

from pdd_ray.config import PddConfig
from pdd_ray.distill.callbacks import StageSink
from pdd_ray.distill.fit_thread import controller_callbacks, fit_off_main_thread
from pdd_ray.distill.identity import selection_recipe
from pdd_ray.distill.methods import Conditioning, MethodContext, StageSets, method_class, method_image_lr, method_settings
from pdd_ray.distill.methods.base import check_real_classes
from pdd_ray.distill.records import StageOutcome
from pdd_ray.distill.stage import Optimisation, Runtime, StageState, StageTask, Validation, stage_worker
from pdd_ray.distill.stage_progress import ProgressBoard, _watch
from pdd_ray.distill.transition import real_indices
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet, random_subset
from pdd_ray.experts.produce import expert_store_root
from pdd_ray.experts.store import TrajectoryStore
from pdd_ray.prepare import Prepared
from pdd_ray.seeding import derive_seed
from pdd_ray.storage import Folder

#: Test hook: rank 0 of the first stage raises once at this iteration (see tests/distill/test_driver.py).
FAIL_AT_ENV = "PDD_RAY_FAIL_AT_ITERATION"


def _real_ref(cfg: PddConfig, prepared: Prepared, k: int):
    """The real examples stage k's matching may draw from (after forgetting-score discarding)."""
    b = prepared.bundle
    indices = real_indices(cfg, prepared, k)
    if indices is None:
        return ray.put((b.train_x, b.train_y))
    check_real_classes(b.train_y[indices], b.num_classes, f"stage {k}")  # one line here, not a worker traceback
    return ray.put((b.train_x[indices], b.train_y[indices]))


def _check_fits_cluster(workers: int, cpus: int, use_gpu: bool) -> None:
    """Refuse a CPU worker layout the cluster can never schedule (Ray would wait forever)."""
    total = ray.cluster_resources().get("CPU", 0)
    if not use_gpu and workers * cpus > total:
        raise PddError(
            f"distill.num_workers x distill.cpus_per_worker = {workers} x {cpus} CPUs, but the Ray cluster has "
            f"{total:g} CPUs; lower one of them"
        )


def _conditioning(cfg: PddConfig, expert_key: str | None) -> Conditioning:
    """The stage's conditioning networks; a method that matches trajectories needs its experts."""
    store = TrajectoryStore(expert_store_root(cfg))
    indices = store.indices(expert_key) if expert_key else []
    if method_class(cfg.distill.method).needs_trajectories and not indices:
        raise PddError(f"no experts under key {expert_key} in {store.root}; run `pdd-ray experts` first")
    return Conditioning(store.root, expert_key, indices)


def _initial_sets(cfg: PddConfig, prepared: Prepared, k: int, cond: Conditioning,
                  frozen: list[StageSet]) -> StageSets:
    """Stage k's initial images: the method's own (DATM: correctly classified reals with the
    expert's logits; IDC: several real images per stored one) or a seeded random subset."""
    d, b = cfg.distill, prepared.bundle
    method = method_class(d.method)
    settings = method_settings(cfg, b.num_classes, k)
    init_seed = derive_seed(cfg.seed, "stage-init", k)
    init_soft = None
    soft_init = method.init_soft_labels(settings, b, d.ipc_per_stage, init_seed, prepared.spec, cond)
    if soft_init is not None:
        init_x, init_y, init_soft = soft_init
    else:
        init = method.init_images(settings, b, d.ipc_per_stage, init_seed)
        init_x, init_y = init if init is not None else random_subset(b, d.ipc_per_stage, init_seed)
    frozen_x = torch.cat([s.images for s in frozen]) if frozen else init_x[:0]
    frozen_y = torch.cat([s.labels for s in frozen]) if frozen else init_y[:0]
    frozen_soft = None
    if init_soft is not None:
        frozen_soft = torch.cat([s.soft_labels for s in frozen]) if frozen else init_soft[:0]
    return StageSets(frozen_x, frozen_y, init_x, init_y, init_soft, frozen_soft)


def _stage_task(cfg: PddConfig, prepared: Prepared, directory: Folder, k: int, cond: Conditioning,
                init: StageSets, board, record: bool) -> StageTask:
    """Everything stage k's workers need; it reaches them through the object store (``run_stage``)."""
    d, b = cfg.distill, prepared.bundle
    method = method_class(d.method)
    settings = method_settings(cfg, b.num_classes, k)
    fail_at = os.environ.get(FAIL_AT_ENV)
    return StageTask(
        method=d.method,
        context=MethodContext(
            stage=k, seed=cfg.seed, spec=prepared.spec, augment=cfg.augment.strategy, settings=settings, sets=init,
            conditioning=cond, real_ref=_real_ref(cfg, prepared, k) if method.needs_real_data else None,
        ),
        optimisation=Optimisation(
            iterations=d.iterations, lr_img=method_image_lr(cfg), lr_lr=d.lr_lr, lr_init=d.lr_init,
            checkpoint_every=d.checkpoint_every, image_limit=float(b.train_x.abs().max()),
            lr_labels=float(settings.get("lr_labels", 0.0)), momentum_labels=float(settings.get("momentum_labels", 0.0)),
        ),
        validation=Validation(every=d.eval_every, runs=d.eval_runs, recipe=selection_recipe(cfg),
                              val_ref=ray.put((b.val_x, b.val_y))),
        runtime=Runtime(
            use_gpu=d.use_gpu, threads=d.cpus_per_worker, trajectories=d.trajectories_per_worker,
            deterministic=d.deterministic, progress=board, record=record,
            fail_at=int(fail_at) if fail_at and k == 1 else None,
            fail_marker=str(directory / "injected_failure.marker"), problem_path=str(_problem_path(directory, k)),
        ),
    )


def _problem_path(directory: Folder, k: int) -> Folder:
    """Where stage k's workers write the one-line reason of a non-finite or diverged stop."""
    return directory / f"stage_{k}.problem.txt"


def _solo_trainer_class():
    """Ray Train v2's ``DataParallelTrainer`` (a DeveloperAPI), or None where it is absent.

    Why: a one-worker stage has nobody to all-reduce with, and ``TorchTrainer`` still makes
    its controller import torch (for ``TorchConfig``) and its worker join a one-rank gloo
    process group. Without them an empty fit took a median 9.4 s here against 14.2 s
    (alternating, 5 each, ``benchmarks/train_start.py``): about 5 s off every stage. The
    worker loop already works without a process group (``stage._all_average``).
    """
    try:
        from ray.train.v2._internal.constants import is_v2_enabled
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:  # pragma: no cover - depends on the installed Ray
        return None
    return DataParallelTrainer if is_v2_enabled() else None


def _trainer(cfg: PddConfig, directory: str | Path | Folder, k: int, task: ray.ObjectRef | None,
             callbacks: list | None = None):
    """The stage's Ray Train trainer: its workers, checkpoints and restarts. Several workers
    get a ``TorchTrainer`` (a process group for their gradient all-reduce); one worker gets a
    plain data-parallel trainer without one (:func:`_solo_trainer_class`).

    ``task`` is the :class:`StageTask` already in the object store: Train hands its
    ``train_loop_config`` to the controller, which unpickles it, and a task's tensors would
    make that process import torch (about 4 s of CPU per stage here) for data only the
    workers read; as a reference it is also stored once, however many workers fetch it.
    """
    directory = Folder.at(directory)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    d = cfg.distill
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.use_gpu else {})}
    common = dict(
        train_loop_config={"task": task},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"stage_{k}",
            # an object store is handed over with its file system (the endpoint the driver resolved)
            storage_path=(directory / "train").path,
            storage_filesystem=None if directory.local else directory.fs,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )
    solo = _solo_trainer_class() if d.num_workers == 1 else None
    if solo is not None:
        return solo(stage_worker, **common)
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(stage_worker, torch_config=TorchConfig(timeout_s=d.collective_timeout_s), **common)


def run_stage(
    cfg: PddConfig,
    prepared: Prepared,
    directory: str | Path | Folder,
    k: int,
    expert_key: str | None,
    frozen: list[StageSet],
    progress: bool = True,
    sink: StageSink | None = None,
) -> StageOutcome:
    """Distill stage k's new images with Ray Train; resumes from its latest checkpoint.

    ``expert_key`` names the stage's conditioning networks in the trajectory store (expert
    trajectories for MTT, networks trained on S_<k for the other methods); None at stage 1 of
    a method that starts from fresh random networks. ``sink`` (the tracker's stage logger)
    gets rank 0's per-iteration metrics and image grids, on this process.
    """
    directory = Folder.at(directory)  # a local path or an object-store URI
    d = cfg.distill
    _check_fits_cluster(d.num_workers, d.cpus_per_worker, d.use_gpu)
    cond = _conditioning(cfg, expert_key)
    init = _initial_sets(cfg, prepared, k, cond, frozen)
    problem_path = _problem_path(directory, k)  # written by the workers if the stage goes non-finite
    problem_path.unlink()
    board = ProgressBoard.options(scheduling_strategy="DEFAULT").remote()
    callbacks = controller_callbacks(board)  # so that Ctrl-C can end the fit before Ray stops
    task = ray.put(_stage_task(cfg, prepared, directory, k, cond, init, board, sink is not None))
    trainer = _trainer(cfg, directory, k, task, callbacks)
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(board, d.iterations, f"stage {k}/{d.num_stages}", progress, stop, sink), daemon=True
    )
    watcher.start()
    try:
        result = fit_off_main_thread(trainer, board, linked=bool(callbacks))
    finally:
        stop.set()
        watcher.join(timeout=10 if sink is None else 120)  # the last records are logged before the stage ends
        ray.kill(board)
    if problem_path.is_file():  # the workers stopped at a NaN/inf: no stage record, no artifact, one line
        problem = problem_path.read_text().strip()
        problem_path.unlink()
        raise PddError(problem)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {k} finished without a checkpoint: {result.error!r}")
    state = StageState.load(result.checkpoint)
    best = state.best
    return StageOutcome(
        images=best.images.float(),
        labels=init.new_labels.clone(),
        alpha=best.alpha,
        best_val_acc=best.acc,
        best_iteration=best.iteration,
        losses=state.losses,
        val_history=state.val_history,
        soft_labels=best.soft_labels.float() if best.soft_labels is not None else None,
        validation_seconds=state.validation_seconds,
        step_seconds=state.step_seconds,
    )
