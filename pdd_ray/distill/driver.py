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
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from pdd_ray.config import PddConfig, dump_config
from pdd_ray.distill.artifact import write_artifact
from pdd_ray.distill.methods import method_class
from pdd_ray.distill.stage import StageTask, load_state, stage_worker
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet, random_subset, recipe_from_config
from pdd_ray.experts.produce import (
    ExpertJob,
    base_settings,
    expert_recipe,
    expert_store_root,
    matching_reach,
    model_meta,
    produce,
    real_examples,
    real_pool,
    stage1_experts,
)
from pdd_ray.experts.store import TrajectoryStore, store_key
from pdd_ray.experts.trajectory import Warmup
from pdd_ray.prepare import Prepared
from pdd_ray.seeding import derive_seed
from pdd_ray.soft_labels import union_targets
from pdd_ray.training import TrainRecipe

#: Top-level config sections that belong to one base method each.
METHOD_SECTIONS = ("dm", "idc", "datm")

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


def run_key(cfg: PddConfig) -> str:
    """Digest of every setting that changes the distilled images (not evaluation or tracking)."""
    d = cfg.model_dump(mode="json")
    for k in ("evaluation", "tracking", "storage", "name"):
        d.pop(k)
    for k in ("max_failures", "checkpoint_every"):
        d["distill"].pop(k)
    if d["distill"]["discard_fraction"] == 0:  # off: keys of runs made before discarding existed stay valid
        for k in ("discard_fraction", "discard_from_stage"):
            d["distill"].pop(k)
    for section in METHOD_SECTIONS:  # another method's settings cannot change these images
        if section != cfg.distill.method:
            d.pop(section, None)
    d["experts"].pop("storage")
    return store_key(d)


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
    """Record stage k as finished: images first, manifest last (the manifest marks completion)."""
    d = directory / f"stage_{k}"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".stage.tmp-{uuid.uuid4().hex}.npz"
    soft = {"soft_labels": out.soft_labels.numpy()} if out.soft_labels is not None else {}
    np.savez(tmp, images=out.images.numpy(), labels=out.labels.numpy(), losses=np.array(out.losses, dtype=np.float64),
             val_history=np.array(out.val_history, dtype=np.float64).reshape(-1, 2), **soft)
    os.replace(tmp, d / "stage.npz")
    _write_json(d / "manifest.json", {"stage": k, "done": True, "alpha": out.alpha,
                                      "best_val_acc": out.best_val_acc, "best_iteration": out.best_iteration})


def load_stage(directory: Path, k: int) -> StageOutcome | None:
    """A finished stage's record, or None when stage k has not finished."""
    d = directory / f"stage_{k}"
    if not (d / "manifest.json").is_file():
        return None
    m = json.loads((d / "manifest.json").read_text())
    with np.load(d / "stage.npz", allow_pickle=False) as z:
        return StageOutcome(torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].copy()),
                            float(m["alpha"]), float(m["best_val_acc"]), int(m["best_iteration"]),
                            z["losses"].tolist(), [(int(i), float(a)) for i, a in z["val_history"]],
                            torch.from_numpy(z["soft_labels"].copy()) if "soft_labels" in z.files else None)


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
    last = 0
    shown: dict = {}
    while not stop.is_set():
        try:
            s = ray.get(board.get.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the bar is cosmetic; never break the run for it
            s = {}
        it = int(s.get("iteration", last))
        post = {k: f"{v:.4g}" for k, v in s.items() if k in ("loss", "alpha", "val_acc") and v == v}
        # redraw only on news, once: job logs are not a TTY and keep every redraw as a line
        if post and post != shown:
            bar.set_postfix(post, refresh=it <= last)
            shown = post
        if it > last:
            bar.update(it - last)
            last = it
        stop.wait(0.5)
    bar.update(max(0, total - last))
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
        eval_recipe=replace(recipe_from_config(cfg.evaluation, cfg.augment.strategy), epochs=d.eval_epochs),
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
        result = trainer.fit()
    finally:
        stop.set()
        watcher.join(timeout=10)
        ray.kill(board)
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
    d, ev = cfg.distill, cfg.evaluation
    store = TrajectoryStore(expert_store_root(cfg))
    trajectories = method_class(d.method).needs_trajectories
    prev = store.indices(prev_key) if prev_key else list(range(cfg.experts.num_experts))
    if d.transition_experts is not None:
        prev = prev[: d.transition_experts]
    alpha = union[-1].lr
    ux = torch.cat([s.images for s in union])
    uy = union_targets([s.labels for s in union], [s.soft_labels for s in union], prepared.spec.num_classes)
    warm = TrainRecipe(epochs=d.transition_syn_epochs, lr=alpha, momentum=ev.momentum, weight_decay=ev.weight_decay,
                       batch_size=ev.batch_size, lr_decay_at_half=True, augment=cfg.augment.strategy)
    reach = matching_reach(cfg) if trajectories else -1
    real = replace(expert_recipe(cfg), epochs=reach + 1)
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


def distill(cfg: PddConfig, prepared: Prepared, progress: bool = True, on_stage=None, tracker=None) -> DistillResult:
    """Run (or resume) every stage of ``cfg`` and write the artifact.

    ``on_stage(k, outcome)`` runs after each stage (a Tune trial reports there); ``tracker`` (a
    :class:`pdd_ray.tracking.RunTracker`) gets a child run per stage.
    """
    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(dump_config(cfg))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    method = method_class(cfg.distill.method)
    key: str | None = None  # stage 1's conditioning pool: none (fresh networks) unless the method matches trajectories
    if method.needs_trajectories:
        key, summaries = stage1_experts(cfg, prepared, progress=progress)
        if tracker is not None:
            tracker.log_expert_summaries(key, summaries)
    elif cfg.distill.discard_fraction > 0:  # the forgetting counts come from stage-1 experts' real-data training
        stage1_experts(cfg, prepared, progress=progress)
    seconds["experts"] = time.perf_counter() - t0
    n_real = prepared.bundle.train_x.shape[0]
    record_real_examples(directory, 1, real_examples(cfg, prepared, 1), n_real, tracker, progress)
    keys = [key]
    stages: list[StageSet] = []  # decoded training images: what evaluation, transitions and the artifact use
    stored: list[StageSet] = []  # what each stage optimised: later stages freeze these
    outcomes: list[StageOutcome] = []
    ev_epochs = cfg.evaluation.epochs_per_stage
    for k in range(1, cfg.distill.num_stages + 1):
        t0 = time.perf_counter()
        target = tracker.stage_target(k, prepared) if tracker is not None else None
        if tracker is not None and key is not None:
            tracker.log_experts(key, k)
        out = load_stage(directory, k)
        from_record = out is not None
        if out is None:
            out = run_stage(cfg, prepared, directory, k, key, stored, progress, log_target=target)
            save_stage(directory, k, out)
        seconds[f"stage_{k}"] = time.perf_counter() - t0
        if tracker is not None:
            tracker.on_stage(k, out, seconds[f"stage_{k}"], from_record)
        outcomes.append(out)
        stored.append(StageSet(out.images, out.labels, lr=out.alpha, epochs=ev_epochs, soft_labels=out.soft_labels))
        train_x, train_y = method.decode(method.stage_params(cfg, prepared.bundle.num_classes, k), out.images, out.labels)
        stages.append(StageSet(train_x, train_y, lr=out.alpha, epochs=ev_epochs, soft_labels=out.soft_labels))
        if on_stage is not None:
            on_stage(k, out)
        if k < cfg.distill.num_stages:
            t0 = time.perf_counter()
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
    return DistillResult(directory, artifact, stages, outcomes, keys, seconds)
