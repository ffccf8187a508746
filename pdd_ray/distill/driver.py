"""The PDD driver: stages in order, each a Ray Train run, with transitions in between.

    experts_1 = stage-1 experts (Ray actors, trajectory store)
    for k in 1..P:
        S_k = TorchTrainer(stage_worker).fit()      # S_<k frozen, best-on-validation kept
        if k < P: experts_{k+1} = transition(experts_k, S_<=k, α_k)   # Ray actors, parallel
    artifact + progressive evaluation + baselines

Idempotent: a finished stage is recorded in ``stage_k/manifest.json`` (with its images in
``stage_k/stage.npz``) and skipped on re-run; an unfinished one resumes inside from its
latest Ray Train checkpoint; experts already in the store are never retrained.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from pdd_ray.config import PddConfig, dump_config
from pdd_ray.distill.artifact import write_artifact
from pdd_ray.distill.health import StageHealth, stage_health
from pdd_ray.distill.methods import method_class
from pdd_ray.distill.methods.base import check_real_classes
from pdd_ray.distill.stage import StageTask, load_state, stage_worker
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet, random_subset, recipe_from_config
from pdd_ray.experts.produce import (
    ExpertJob,
    base_settings,
    expert_recipe,
    expert_store_root,
    kept_epochs,
    matching_reach,
    model_meta,
    produce,
    real_examples,
    real_pool,
    stage1_experts,
)
from pdd_ray.experts.store import TrajectoryStore, store_key
from pdd_ray.experts.trajectory import Warmup
from pdd_ray.integrity import file_sha256, verify_files
from pdd_ray.locks import file_lock
from pdd_ray.prepare import Prepared, data_settings
from pdd_ray.progress import Milestones, phase, time_left
from pdd_ray.progress import log as progress_log
from pdd_ray.seeding import derive_seed
from pdd_ray.soft_labels import union_targets
from pdd_ray.training import TrainRecipe

#: Test hook: rank 0 of the first stage raises once at this iteration (see tests/test_driver.py).
FAIL_AT_ENV = "PDD_RAY_FAIL_AT_ITERATION"


@dataclass
class StageOutcome:
    """What a finished stage contributes: its images, labels, learned lr and history."""

    images: torch.Tensor
    labels: torch.Tensor
    alpha: float
    best_val_acc: float
    best_iteration: int
    losses: list[float]
    val_history: list[tuple[int, float]]
    soft_labels: torch.Tensor | None = None  # learned logits (DATM), None for hard labels


def selection_recipe(cfg: PddConfig) -> TrainRecipe:
    """The recipe of the in-loop validation networks (selection of the stage's best iterate).

    The evaluation section's optimiser settings with ``distill.eval_epochs``; its lr is not
    used (each validation trains with the stage's α, see ``stage.validate``), so it is pinned
    here and a change of ``evaluation.lr`` cannot reach the run key.
    """
    return replace(recipe_from_config(cfg.evaluation, cfg.augment.strategy), epochs=cfg.distill.eval_epochs, lr=0.0)


def warmup_recipe(cfg: PddConfig, alpha: float) -> TrainRecipe:
    """A transition expert's warm-up on the synthetic union S_<=k (lr α_k, evaluation's optimiser)."""
    d, ev = cfg.distill, cfg.evaluation
    return TrainRecipe(epochs=d.transition_syn_epochs, lr=alpha, momentum=ev.momentum, weight_decay=ev.weight_decay,
                       batch_size=ev.batch_size, lr_decay_at_half=True, augment=cfg.augment.strategy)


def transition_real_recipe(cfg: PddConfig) -> TrainRecipe:
    """A transition expert's real-data phase: the experts' recipe for the epochs matching reaches
    (none for methods without trajectories: they only need the conditioned networks)."""
    reach = matching_reach(cfg) if method_class(cfg.distill.method).needs_trajectories else -1
    return replace(expert_recipe(cfg), epochs=reach + 1)


def stage_settings(cfg: PddConfig, k: int) -> dict:
    """What stage k's workers consume besides their conditioning pool and the frozen stages
    (both keyed by their own settings): the same values ``run_stage`` puts into the ``StageTask``."""
    d = cfg.distill
    method = method_class(d.method)
    return {
        "method": d.method,
        # per class: the class count is fixed by the data settings, which are part of the run key
        "params": method.stage_params(cfg, 1, k),
        "init": {"ipc": d.ipc_per_stage, "seed": derive_seed(cfg.seed, "stage-init", k)},
        "iterations": d.iterations,
        "lr_img": method.image_lr(cfg),
        "lr_lr": d.lr_lr,
        "lr_init": d.lr_init,
        "eval_every": d.eval_every,
        "eval_runs": d.eval_runs,
        "selection": asdict(selection_recipe(cfg)),
        "augment": cfg.augment.strategy,
        "workers": {"num_workers": d.num_workers, "threads": d.cpus_per_worker, "use_gpu": d.use_gpu,
                    "deterministic": d.deterministic},
    }


def conditioning_settings(cfg: PddConfig) -> dict:
    """What the stages' conditioning pools consume: stage-1 experts (when the method matches
    trajectories or discarding needs their forgetting counts), the transitions, the discard."""
    d = cfg.distill
    method = method_class(d.method)
    out: dict = {}
    if method.needs_trajectories or d.discard_fraction > 0:
        out["stage1_experts"] = {"recipe": asdict(expert_recipe(cfg)), "keep_epochs": kept_epochs(cfg),
                                 "num_experts": cfg.experts.num_experts}
    if d.num_stages > 1:
        out["transition"] = {"warmup": asdict(warmup_recipe(cfg, alpha=0.0)),  # α_k: from the stage itself
                             "real": asdict(transition_real_recipe(cfg)),
                             "num_experts": cfg.experts.num_experts, "transition_experts": d.transition_experts}
    if d.discard_fraction > 0:
        out["discard"] = {"fraction": d.discard_fraction, "from_stage": d.discard_from_stage,
                          "min_per_class": d.discard_min_per_class}
    return out


def run_settings(cfg: PddConfig) -> dict:
    """The settings objects a run's cached results (finished stages, Train checkpoints,
    transition experts) consume, built by the same functions that hand them to their consumers.

    Nothing is dropped by name: what is not built here (tracking, storage, name, ``max_failures``,
    ``checkpoint_every``, the evaluation settings used only after distillation, another
    method's section) cannot change the key; what is (``evaluation.weight_decay`` via the
    in-loop selection recipe and the transition warm-up, ...) always does.
    """
    return {
        "data": data_settings(cfg),  # what prepare() loads: dataset, split, ZCA, image size
        "model": cfg.model.model_dump(mode="json"),
        "seed": cfg.seed,
        "num_stages": cfg.distill.num_stages,
        "stages": [stage_settings(cfg, k) for k in range(1, cfg.distill.num_stages + 1)],
        "conditioning": conditioning_settings(cfg),
    }


def run_key(cfg: PddConfig) -> str:
    """Digest of :func:`run_settings`: the run directory's key."""
    return store_key(run_settings(cfg))


def run_dir(cfg: PddConfig) -> Path:
    """``<storage>/runs/<name>-<key>``: the same config finds its run again."""
    root = cfg.storage_root
    if "://" in root and not root.startswith("file://"):
        raise PddError(f"storage = {root!r}: runs need a local or shared (NFS) path for now; use an absolute path")
    root = root.removeprefix("file://")
    return Path(root) / "runs" / f"{cfg.name}-{run_key(cfg)}"


# ----------------------------------------------------------------------------------------------
# stage records
# ----------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_stage(directory: Path, k: int, out: StageOutcome) -> None:
    """Record stage k as finished: images first, manifest last (the manifest marks completion).

    The manifest lists the SHA-256 of ``stage.npz``, so :func:`load_stage` can tell a damaged
    record from a good one.
    """
    d = directory / f"stage_{k}"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".stage.tmp-{uuid.uuid4().hex}.npz"
    soft = {"soft_labels": out.soft_labels.numpy()} if out.soft_labels is not None else {}
    np.savez(tmp, images=out.images.numpy(), labels=out.labels.numpy(), losses=np.array(out.losses, dtype=np.float64),
             val_history=np.array(out.val_history, dtype=np.float64).reshape(-1, 2), **soft)
    digest = file_sha256(tmp)
    os.replace(tmp, d / "stage.npz")
    _write_json(d / "manifest.json", {"stage": k, "done": True, "alpha": out.alpha,
                                      "best_val_acc": out.best_val_acc, "best_iteration": out.best_iteration,
                                      "sha256": {"stage.npz": digest}})


def load_stage(directory: Path, k: int) -> StageOutcome | None:
    """A finished stage's record, or None when stage k has not finished.

    A record that does not match its manifest's digest, or cannot be parsed, is a
    :class:`PddError`: training on damaged images would go unnoticed. Records written before
    digests existed (no ``sha256`` in the manifest) are read unverified.
    """
    d = directory / f"stage_{k}"
    if not (d / "manifest.json").is_file():
        return None
    fix = (f"delete {d} and re-run: the stage is finished again from its last checkpoint "
           f"({directory / 'train' / f'stage_{k}'}), or distilled again if that is gone")
    try:
        m = json.loads((d / "manifest.json").read_text())
        if not isinstance(m, dict):
            raise ValueError(f"holds a {type(m).__name__}, not an object")
        if "sha256" in m:
            verify_files(d, m["sha256"], f"stage record {d}", fix)
        with np.load(d / "stage.npz", allow_pickle=False) as z:
            return StageOutcome(torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].copy()),
                                float(m["alpha"]), float(m["best_val_acc"]), int(m["best_iteration"]),
                                z["losses"].tolist(), [(int(i), float(a)) for i, a in z["val_history"]],
                                torch.from_numpy(z["soft_labels"].copy()) if "soft_labels" in z.files else None)
    except PddError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        why = " ".join(str(err).split())[:160]
        raise PddError(f"stage record {d} is truncated or corrupt ({type(err).__name__}: {why}); {fix}") from None


# ----------------------------------------------------------------------------------------------
# progress: workers push, a driver thread draws
# ----------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Tiny actor the stage workers report to, so the driver can draw a live progress bar."""

    def __init__(self) -> None:
        self.state: dict = {}

    def update(self, **kw) -> None:
        self.state.update(kw)

    def get(self) -> dict:
        return dict(self.state)


def _watch(board, total: int, desc: str, enabled: bool, stop: threading.Event) -> None:
    bar = tqdm(total=total, desc=desc, unit="it", disable=not enabled)
    seen = {"last": 0, "shown": {}, "lines": None, "first": None}

    def poll() -> None:
        try:
            s = ray.get(board.get.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the bar is cosmetic; never break the run for it
            s = {}
        last = seen["last"]
        it = int(s.get("iteration", last))
        post = {k: f"{v:.4g}" for k, v in s.items() if k in ("loss", "alpha", "val_acc") and v == v}
        # redraw only on news, once: job logs are not a TTY and keep every redraw as a line
        if post and post != seen["shown"]:
            bar.set_postfix(post, refresh=it <= last)
            seen["shown"] = post
        if it <= last:
            return
        if seen["first"] is None:  # the rate excludes Train's start-up; a resumed stage starts past 0
            seen["first"] = (last if last else it - 1, time.perf_counter())
            seen["lines"] = Milestones(total, start=seen["first"][0])  # plain lines: every ~10 %
        bar.update(it - last)
        seen["last"] = it
        if seen["lines"].due(it):
            start, t0 = seen["first"]
            val = s.get("val_acc", float("nan"))
            val_s = f", val {val * 100:.1f}%" if val == val else ""
            left = time_left(it - start, total - start, time.perf_counter() - t0)
            progress_log.info("%s: %d/%d it (%d%%), loss %.4g%s%s", desc, it, total, 100 * it // max(total, 1),
                              s.get("loss", float("nan")), val_s, f", {left}" if left else "")

    while not stop.is_set():
        poll()
        stop.wait(0.5)
    poll()  # the last iterations finished after the previous poll
    bar.update(max(0, total - seen["last"]))
    bar.close()


# ----------------------------------------------------------------------------------------------
# one stage on Ray Train
# ----------------------------------------------------------------------------------------------


def _real_ref(cfg: PddConfig, prepared: Prepared, k: int):
    """The real examples stage k's matching may draw from (after forgetting-score discarding)."""
    b = prepared.bundle
    pool = real_pool(cfg, prepared, k)
    if pool is None:
        return ray.put((b.train_x, b.train_y))
    check_real_classes(b.train_y[pool], b.num_classes, f"stage {k}")  # one line here, not a worker traceback
    return ray.put((b.train_x[pool], b.train_y[pool]))


def _check_fits_cluster(workers: int, cpus: int, use_gpu: bool) -> None:
    """Refuse a CPU worker layout the cluster can never schedule (Ray would wait forever)."""
    total = ray.cluster_resources().get("CPU", 0)
    if not use_gpu and workers * cpus > total:
        raise PddError(
            f"distill.num_workers x distill.cpus_per_worker = {workers} x {cpus} CPUs, but the Ray cluster has "
            f"{total:g} CPUs; lower one of them"
        )


def run_stage(
    cfg: PddConfig,
    prepared: Prepared,
    directory: Path,
    k: int,
    expert_key: str | None,
    frozen: list[StageSet],
    progress: bool = True,
    log_target=None,
) -> StageOutcome:
    """Distill stage k's new images with a TorchTrainer; resumes from its latest checkpoint.

    ``expert_key`` names the stage's conditioning pool in the trajectory store (expert
    trajectories for MTT, networks trained on S_<k for the other methods); None at stage 1 of
    a method that starts from fresh random networks.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d, b = cfg.distill, prepared.bundle
    _check_fits_cluster(d.num_workers, d.cpus_per_worker, d.use_gpu)
    method = method_class(d.method)
    store = TrajectoryStore(expert_store_root(cfg))
    indices = store.indices(expert_key) if expert_key else []
    if method.needs_trajectories and not indices:
        raise PddError(f"no experts under key {expert_key} in {store.root}; run `pdd-ray experts` first")
    params = method.stage_params(cfg, b.num_classes, k)
    init_seed = derive_seed(cfg.seed, "stage-init", k)
    init_soft = None
    soft_init = method.init_soft_labels(params, b, d.ipc_per_stage, init_seed, prepared.spec, store.root, expert_key,
                                        indices)  # DATM: correctly classified reals and the expert's logits
    if soft_init is not None:
        init_x, init_y, init_soft = soft_init
    else:
        init = method.init_images(params, b, d.ipc_per_stage, init_seed)  # IDC: several real images per stored one
        init_x, init_y = init if init is not None else random_subset(b, d.ipc_per_stage, init_seed)
    frozen_x = torch.cat([s.images for s in frozen]) if frozen else init_x[:0]
    frozen_y = torch.cat([s.labels for s in frozen]) if frozen else init_y[:0]
    frozen_soft = None
    if init_soft is not None:
        frozen_soft = torch.cat([s.soft_labels for s in frozen]) if frozen else init_soft[:0]
    fail_at = os.environ.get(FAIL_AT_ENV)
    problem_path = directory / f"stage_{k}.problem.txt"  # written by the workers if the stage goes non-finite
    problem_path.unlink(missing_ok=True)
    board = ProgressBoard.options(scheduling_strategy="DEFAULT").remote()
    task = StageTask(
        stage=k,
        method=d.method,
        params=params,
        spec=prepared.spec,
        store_root=store.root,
        expert_key=expert_key,
        expert_indices=indices,
        frozen_images=frozen_x,
        frozen_labels=frozen_y,
        init_images=init_x,
        new_labels=init_y,
        val_ref=ray.put((b.val_x, b.val_y)),
        iterations=d.iterations,
        lr_img=method.image_lr(cfg),
        lr_lr=d.lr_lr,
        lr_init=d.lr_init,
        eval_every=d.eval_every,
        eval_runs=d.eval_runs,
        eval_recipe=selection_recipe(cfg),
        checkpoint_every=d.checkpoint_every,
        augment=cfg.augment.strategy,
        seed=cfg.seed,
        use_gpu=d.use_gpu,
        real_ref=_real_ref(cfg, prepared, k) if method.needs_real_data else None,
        threads=d.cpus_per_worker,
        fail_at=int(fail_at) if fail_at and k == 1 else None,
        fail_marker=str(directory / "injected_failure.marker"),
        progress=board,
        log_target=log_target,
        deterministic=d.deterministic,
        image_limit=float(b.train_x.abs().max()),
        problem_path=str(problem_path),
        init_soft_labels=init_soft,
        frozen_soft_labels=frozen_soft,
        lr_labels=float(params.get("lr_labels", 0.0)),
        momentum_labels=float(params.get("momentum_labels", 0.0)),
    )
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config={"task": task},
        scaling_config=ScalingConfig(
            num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker={"CPU": d.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=f"stage_{k}",
            storage_path=str(directory / "train"),
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(board, d.iterations, f"stage {k}/{d.num_stages}", progress, stop), daemon=True
    )
    watcher.start()
    try:
        result = _fit_off_main_thread(trainer)
    finally:
        stop.set()
        watcher.join(timeout=10)
        ray.kill(board)
    if problem_path.is_file():  # the workers stopped at a NaN/inf: no stage record, no artifact, one line
        problem = problem_path.read_text().strip()
        problem_path.unlink(missing_ok=True)
        raise PddError(problem)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {k} finished without a checkpoint: {result.error!r}")
    s = load_state(result.checkpoint)
    return StageOutcome(
        images=s["best_images"].float(),
        labels=init_y.clone(),
        alpha=float(s["best_alpha"]),
        best_val_acc=float(s["best_acc"]),
        best_iteration=int(s["best_iteration"]),
        losses=s["losses"].tolist(),
        val_history=[(int(i), float(a)) for i, a in s["val_history"].tolist()],
        soft_labels=s["best_soft_labels"].float() if "best_soft_labels" in s else None,
    )


def _fit_off_main_thread(trainer):
    """``trainer.fit()`` in a helper thread, the main thread waiting.

    On the main thread Ray Train installs its own SIGINT handler and never removes it: Ctrl-C then
    aborts the Train run and the process exits 1 with no message, during the stage and in every
    phase after it. Off the main thread Train leaves SIGINT alone (as under Tune), so Ctrl-C raises
    KeyboardInterrupt here and the CLI stops Ray, closes the MLflow runs and exits 130; the
    stage's checkpoints stay for the re-run.
    """
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name="pdd-ray-stage", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


# ----------------------------------------------------------------------------------------------
# transition: experts for stage k+1 start from models trained on S_<=k
# ----------------------------------------------------------------------------------------------


def transition_jobs(cfg: PddConfig, prepared: Prepared, k: int, prev_key: str | None,
                    union: list[StageSet]) -> list[ExpertJob]:
    """Expert j of stage k+1: expert j's start weights, trained on S_<=k with α_k, then real data.

    Methods without trajectories (``needs_trajectories`` False) get only the conditioned
    networks: snapshot 0 after the union, no real epochs; with no previous pool (stage 1)
    they start from seeded random networks.
    """
    d = cfg.distill
    store = TrajectoryStore(expert_store_root(cfg))
    prev = store.indices(prev_key) if prev_key else list(range(cfg.experts.num_experts))
    if d.transition_experts is not None:
        prev = prev[: d.transition_experts]
    alpha = union[-1].lr
    ux = torch.cat([s.images for s in union])
    uy = union_targets([s.labels for s in union], [s.soft_labels for s in union], prepared.spec.num_classes)
    warm = warmup_recipe(cfg, alpha)
    real = transition_real_recipe(cfg)
    reach = real.epochs - 1
    pool = real_pool(cfg, prepared, k + 1) if real.epochs > 0 else None  # forgetting-score discarding
    kept = ({"real_pool": {"fraction": d.discard_fraction, "size": int(pool.numel()), "kept": _digest(pool)}}
            if pool is not None else {})
    union_digest = store_key({"images": _digest(ux), "labels": _digest(uy), "alpha": alpha})
    key = store_key({**base_settings(cfg, prepared), "kind": "transition", "stage": k + 1, "prev": prev_key,
                     "union": union_digest, "warmup": asdict(warm), "recipe": asdict(real), **kept})
    common = {**base_settings(cfg, prepared), **model_meta(prepared.spec), "optimizer": asdict(real), "stage": k + 1,
              "warmup": asdict(warm), "prev_key": prev_key, **kept}
    return [
        ExpertJob(key=key, index=j, seed=derive_seed(cfg.seed, "transition", k + 1, j), recipe=real,
                  keep_epochs=reach + 1, meta={**common, "seed": derive_seed(cfg.seed, "transition", k + 1, j),
                                               "expert_index": j},
                  init_from=(prev_key, j) if prev_key else None, warmup=Warmup(ux, uy, warm), pool=pool)
        for j in prev
    ]


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_transition(cfg: PddConfig, prepared: Prepared, k: int, prev_key: str | None, union: list[StageSet],
                   progress: bool = True, directory: Path | None = None, tracker=None) -> str:
    """Produce (or find) the experts of stage k+1 in parallel; returns their store key.

    With ``directory``, the number of real examples the new experts trained on is recorded
    in ``<directory>/real_examples.json`` (and on ``tracker``), see :func:`record_real_examples`.
    """
    jobs = transition_jobs(cfg, prepared, k, prev_key, union)
    store = TrajectoryStore(expert_store_root(cfg))
    produce(store, jobs, prepared, cfg.experts.cpus, cfg.experts.gpus, f"transition {k}->{k + 1}", progress)
    if directory is not None and jobs:  # the experts' real data (MTT) or the matched real batches (DM, IDC)
        pool = jobs[0].pool  # already selected for the experts' real epochs; else read the counts
        n = int(pool.numel()) if pool is not None else real_examples(cfg, prepared, k + 1)
        record_real_examples(directory, k + 1, n, prepared.bundle.train_x.shape[0], tracker, progress)
    return jobs[0].key


def record_real_examples(directory: Path, k: int, n: int, total: int, tracker=None, progress: bool = True) -> None:
    """Note that stage k used ``n`` of the ``total`` real training examples (forgetting-score discarding)."""
    path = directory / "real_examples.json"
    counts = json.loads(path.read_text()) if path.is_file() else {}
    counts[f"stage_{k}"] = n
    _write_json(path, counts)
    if tracker is not None:
        tracker.log_real_examples(k, n)
    if progress and n < total:
        tqdm.write(f"stage {k}: real pool {n} of {total} examples (distill.discard_fraction)")


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    """Where the run lives and what it produced."""

    directory: Path
    artifact: Path
    stages: list[StageSet]
    outcomes: list[StageOutcome]
    expert_keys: list[str | None]
    seconds: dict[str, float]
    health: list[StageHealth] = field(default_factory=list)  # per stage: kept the initialisation? diverged?


def run_lock(cfg: PddConfig):
    """Exclusive lock on ``cfg``'s run directory (a context manager; see :mod:`pdd_ray.locks`).

    Two runs of the same config in one storage would otherwise train the same stages twice and
    rewrite each other's artifact; with it the second waits, then finds every stage finished.
    The lock file sits beside the run directory, so deleting the directory cannot split it.
    """
    directory = run_dir(cfg)
    return file_lock(directory.parent / f".{directory.name}.lock", f"run directory {directory}")


def distill(cfg: PddConfig, prepared: Prepared, progress: bool = True, on_stage=None, tracker=None) -> DistillResult:
    """Run (or resume) every stage of ``cfg`` and write the artifact, holding :func:`run_lock`.

    ``on_stage(k, outcome)`` runs after each stage (a Tune trial reports there); ``tracker`` (a
    :class:`pdd_ray.tracking.RunTracker`) gets a child run per stage.
    """
    with run_lock(cfg):
        return _distill(cfg, prepared, progress, on_stage, tracker)


def _distill(cfg: PddConfig, prepared: Prepared, progress: bool, on_stage, tracker) -> DistillResult:
    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(dump_config(cfg))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    method = method_class(cfg.distill.method)
    key: str | None = None  # stage 1's conditioning pool: none (fresh networks) unless the method matches trajectories
    if method.needs_trajectories:
        with phase("experts"):
            key, summaries = stage1_experts(cfg, prepared, progress=progress)
        if tracker is not None:
            tracker.log_expert_summaries(key, summaries)
    elif cfg.distill.discard_fraction > 0:  # the forgetting counts come from stage-1 experts' real-data training
        with phase("experts"):
            stage1_experts(cfg, prepared, progress=progress)
    seconds["experts"] = time.perf_counter() - t0
    n_real = prepared.bundle.train_x.shape[0]
    record_real_examples(directory, 1, real_examples(cfg, prepared, 1), n_real, tracker, progress)
    keys = [key]
    stages: list[StageSet] = []  # decoded training images: what evaluation, transitions and the artifact use
    stored: list[StageSet] = []  # what each stage optimised: later stages freeze these
    outcomes: list[StageOutcome] = []
    health: list[StageHealth] = []
    ev_epochs = cfg.evaluation.epochs_per_stage
    for k in range(1, cfg.distill.num_stages + 1):
        t0 = time.perf_counter()
        target = tracker.stage_target(k, prepared) if tracker is not None else None
        if tracker is not None and key is not None:
            tracker.log_experts(key, k)
        out = load_stage(directory, k)
        from_record = out is not None
        if out is None:
            with phase(f"stage {k}/{cfg.distill.num_stages}"):
                out = run_stage(cfg, prepared, directory, k, key, stored, progress, log_target=target)
            save_stage(directory, k, out)
        else:
            progress_log.info("stage %d/%d: finished earlier, read from %s", k, cfg.distill.num_stages,
                              directory / f"stage_{k}")
        seconds[f"stage_{k}"] = time.perf_counter() - t0
        health.append(stage_health(k, out.best_iteration, out.best_val_acc, out.val_history,
                                   prepared.bundle.num_classes, cfg.distill.iterations))
        if health[-1].warning:
            print(f"pdd-ray: warning: {health[-1].warning}", file=sys.stderr, flush=True)
        if tracker is not None:
            tracker.log_stage_health(health[-1])
            tracker.on_stage(k, out, seconds[f"stage_{k}"], from_record)
        outcomes.append(out)
        stored.append(StageSet(out.images, out.labels, lr=out.alpha, epochs=ev_epochs, soft_labels=out.soft_labels))
        train_x, train_y = method.decode(method.stage_params(cfg, prepared.bundle.num_classes, k), out.images, out.labels)
        stages.append(StageSet(train_x, train_y, lr=out.alpha, epochs=ev_epochs, soft_labels=out.soft_labels))
        if on_stage is not None:
            on_stage(k, out)
        if k < cfg.distill.num_stages:
            t0 = time.perf_counter()
            with phase(f"transition {k}->{k + 1}"):
                key = run_transition(cfg, prepared, k, key, stages, progress, directory=directory, tracker=tracker)
            seconds[f"transition_{k}"] = time.perf_counter() - t0
            keys.append(key)
    b = prepared.bundle
    artifact = write_artifact(
        directory / "artifact",
        stages,
        prepared.spec,
        {"name": b.name, "digest": b.digest, "classes": b.class_names, "shape": list(b.shape)},
        b.mean,
        b.std,
        prepared.zca,
        recipe_from_config(cfg.evaluation, cfg.augment.strategy),
        cfg.evaluation.carry_optimizer_state,
        {"run_key": run_key(cfg), "expert_keys": keys, "config": cfg.model_dump(mode="json")},
        decode=method.decode_info(method.stage_params(cfg, b.num_classes, 1)),
    )
    return DistillResult(directory, artifact, stages, outcomes, keys, seconds, health)
