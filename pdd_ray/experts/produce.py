"""Producing expert trajectories in parallel on Ray actors, resumably.

Every peer trains its experts one after another and pickles lists of ten; here each expert is
one job for a pool of actors, each job writes its own Arrow file atomically, and re-running
skips the files that already exist, so a killed run loses at most the experts in flight.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace

import ray
import torch
from ray.util import ActorPool
from tqdm.auto import tqdm

from pdd_ray.allocator import keep_freed_memory
from pdd_ray.config import PddConfig
from pdd_ray.errors import PddError
from pdd_ray.experts.store import TrajectoryStore, store_key
from pdd_ray.experts.trajectory import RealSplits, Warmup, load_start_params, record_trajectory
from pdd_ray.forgetting import forgetting_counts, scatter, write_counts
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import ModelSpec
from pdd_ray.prepare import Prepared
from pdd_ray.progress import log as progress_log
from pdd_ray.progress import time_left
from pdd_ray.seeding import derive_seed
from pdd_ray.training import TrainRecipe


@dataclass
class ExpertJob:
    """One trajectory to produce: where it goes, how it is trained, where it starts."""

    key: str
    index: int
    seed: int
    recipe: TrainRecipe
    keep_epochs: int
    meta: dict
    init_from: tuple[str, int] | None = None  # (store key, expert index): start from its row 0
    warmup: Warmup | None = None
    real_indices: torch.Tensor | None = None  # indices into the real training set; None = all of it


def expert_recipe(cfg: PddConfig) -> TrainRecipe:
    """The real-data recipe of every expert: constant-lr SGD with DSA (pdd-reference §4)."""
    e = cfg.experts
    return TrainRecipe(
        epochs=e.epochs,
        lr=e.lr,
        momentum=e.momentum,
        weight_decay=e.weight_decay,
        batch_size=e.batch_size,
        lr_decay_at_half=False,
        augment=cfg.augment.strategy,
    )


def matching_reach(cfg: PddConfig) -> int:
    """Last epoch index trajectory matching can touch: start < max_start_epoch, + expert_epochs.

    DATM's window may grow during a stage and move per stage: its furthest upper bound counts."""
    if cfg.distill.method == "datm":
        from pdd_ray.distill.methods.datm import datm_reach

        return datm_reach(cfg)
    return cfg.distill.max_start_epoch + cfg.distill.expert_epochs


def base_settings(cfg: PddConfig, prepared: Prepared) -> dict:
    """Everything (besides the recipe) that determines a trajectory: part of every store key."""
    b = prepared.bundle
    return {
        "dataset": b.name,
        "dataset_digest": b.digest,
        "split": {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction, "seed": cfg.data.split_seed},
        "zca_digest": prepared.zca.digest if prepared.zca is not None else None,
        "model": prepared.spec.to_dict(),
        "seed": cfg.seed,
    }


def kept_epochs(cfg: PddConfig) -> int:
    """Last epoch stored per expert: all of them, or only what matching can reach (MTT #4)."""
    return cfg.experts.epochs if cfg.experts.keep_all_epochs else matching_reach(cfg)


def stage1_key(cfg: PddConfig, prepared: Prepared) -> str:
    """Store key of the stage-1 experts (random init, real data)."""
    settings = {**base_settings(cfg, prepared), "recipe": asdict(expert_recipe(cfg)), "keep_epochs": kept_epochs(cfg)}
    return store_key({**settings, "kind": "stage1"})


def model_meta(spec: ModelSpec) -> dict:
    """Parameter names and shapes, so a reader can check it rebuilds the same network."""
    flat = FlatModel(spec.build())
    return {
        "model": spec.to_dict(),
        "param_names": list(flat.names),
        "param_shapes": [list(s) for s in flat.shapes],
        "param_count": int(flat.numel),
    }


def stage1_jobs(cfg: PddConfig, prepared: Prepared) -> list[ExpertJob]:
    """The stage-1 expert jobs of ``cfg``; each expert's seed derives from (seed, index)."""
    key = stage1_key(cfg, prepared)
    recipe = expert_recipe(cfg)
    keep = kept_epochs(cfg)
    common = {**base_settings(cfg, prepared), **model_meta(prepared.spec), "optimizer": asdict(recipe), "stage": 1}
    return [
        ExpertJob(
            key=key,
            index=j,
            seed=derive_seed(cfg.seed, "expert", j),
            recipe=recipe,
            keep_epochs=keep,
            meta={**common, "seed": derive_seed(cfg.seed, "expert", j), "expert_index": j},
        )
        for j in range(cfg.experts.num_experts)
    ]


def expected_meta(job: ExpertJob) -> dict:
    """Fields a stored file must share with the job to be reused."""
    return {k: job.meta[k] for k in ("dataset_digest", "param_count", "model", "seed") if k in job.meta}


@ray.remote
class ExpertWorker:
    """Holds one copy of the real data and trains experts on it, one job at a time."""

    def __init__(self, data: dict, spec: ModelSpec, store_root: str, use_gpu: bool, threads: int = 1) -> None:
        # CPU kernels reduce in a thread-count-dependent order; pinning the count to the CPUs
        # requested makes a trajectory bit-identical wherever (and however parallel) it is made.
        torch.set_num_threads(threads)
        keep_freed_memory()
        self.data = data
        self.spec = spec
        self.store = TrajectoryStore(store_root)
        self.use_gpu = use_gpu

    def run(self, job: ExpertJob, **shared: object) -> dict:
        """Train and store one expert. ``shared`` holds the job's large fields that the jobs of a
        transition have in common (:func:`shared_fields`): passed as object refs in keyword
        arguments, which Ray resolves from the object store, where each was put once."""
        if shared:
            job = replace(job, **shared)
        init = None
        if job.init_from is not None:
            with self.store.open(*job.init_from) as reader:
                init = load_start_params(reader.params(0))
        train_x, train_y = self.data["train_x"], self.data["train_y"]
        if job.real_indices is not None:
            train_x, train_y = train_x[job.real_indices], train_y[job.real_indices]
        traj = record_trajectory(
            self.spec,
            RealSplits(train_x, train_y, self.data["val_x"], self.data["val_y"]),
            job.recipe,
            job.seed,
            job.keep_epochs,
            init_params=init,
            warmup=job.warmup,
            use_gpu=self.use_gpu,
        )
        meta = {
            **job.meta,
            "epochs": traj.epochs,
            "val_acc": traj.val_acc,
            "final_train_acc": traj.final_train_acc,
            "final_val_acc": traj.final_val_acc,
        }
        # counts first: a complete trajectory file then always has its counts beside it
        counts = scatter(forgetting_counts(traj.correct), job.real_indices, self.data["train_x"].shape[0])
        write_counts(self.store, job.key, job.index, counts, job.recipe.epochs)
        self.store.write(job.key, job.index, traj.params, meta, epochs=traj.epochs)
        return {"index": job.index, "final_val_acc": traj.final_val_acc, "final_train_acc": traj.final_train_acc,
                "real_examples": int(train_x.shape[0])}


#: ExpertJob fields that many jobs share (a transition's union, its real-example indices): sent
#: through the object store once, not serialised into every job.
SHARED_FIELDS = ("warmup", "real_indices")


def shared_fields(jobs: list[ExpertJob]) -> list[tuple[ExpertJob, dict]]:
    """Each job stripped of its shared fields, with object refs to put back in the worker.

    Why: at Tiny ImageNet IPC 50 the union a transition's experts warm up on is ~393 MB; inline
    in each of 100 jobs that is ~39 GB through the object store. Equal objects (the same Python
    object, as ``transition_jobs`` builds them) are put once and every job gets the same ref.
    """
    refs: dict[int, ray.ObjectRef] = {}
    out = []
    for job in jobs:
        shared = {}
        for name in SHARED_FIELDS:
            value = getattr(job, name)
            if value is not None:
                if id(value) not in refs:
                    refs[id(value)] = ray.put(value)
                shared[name] = refs[id(value)]
        out.append((replace(job, **{name: None for name in shared}), shared))
    return out


def missing_jobs(store: TrajectoryStore, jobs: list[ExpertJob]) -> list[ExpertJob]:
    """Jobs whose file is absent. A present file with other settings is an error, not a reuse."""
    todo = []
    for job in jobs:
        if store.exists(job.key, job.index):
            store.open(job.key, job.index, expect=expected_meta(job)).close()
        else:
            todo.append(job)
    return todo


def _fits(resources: dict, n: int, cpus: float, gpus: float) -> int:
    """How many experts asking ``cpus``/``gpus`` each fit in ``resources`` (at most ``n``)."""
    by_cpu = int(resources.get("CPU", 0) // cpus) if cpus > 0 else n
    by_gpu = int(resources.get("GPU", 0) // gpus) if gpus > 0 else n
    return min(n, by_cpu, by_gpu)


def pool_size(n: int, cpus: float, gpus: float, settle_s: float = 5.0) -> int:
    """Actors to start for ``n`` experts: as many as the *free* resources hold, at least one.

    Free, not total, so a run inside a Tune trial does not queue actors behind its siblings.
    But resources of actors or Train workers that just ended are released asynchronously, so
    right after a stage the free count can read 0 (this once made every transition run on a
    single actor): re-read for up to ``settle_s`` seconds while fewer fit than the cluster's
    total would allow.
    """
    total = _fits(ray.cluster_resources(), n, cpus, gpus)
    if gpus > 0 and total < 1:
        raise PddError(f"experts.gpus = {gpus} but the cluster has {ray.cluster_resources().get('GPU', 0)} GPUs")
    best = _fits(ray.available_resources(), n, cpus, gpus)
    deadline = time.monotonic() + settle_s
    while best < total and time.monotonic() < deadline:
        time.sleep(0.25)
        best = max(best, _fits(ray.available_resources(), n, cpus, gpus))
    return max(1, best)


def produce(
    store: TrajectoryStore,
    jobs: list[ExpertJob],
    prepared: Prepared,
    cpus: float = 1.0,
    gpus: float = 0.0,
    desc: str = "experts",
    progress: bool = True,
    on_done=None,
) -> list[dict]:
    """Run the missing ``jobs`` on a pool of actors; returns one summary per job run now.

    The pool size follows from the cluster's free resources and the per-expert request
    (``cpus``/``gpus``, fractional GPUs let several small experts share a device). Each key's
    store lock is held throughout, so a concurrent producer of the same experts waits and then
    finds them present.
    """
    with ExitStack() as locks:
        for key in sorted({j.key for j in jobs}):  # sorted: two producers never wait on each other
            locks.enter_context(store.lock(key))
        return _produce_locked(store, jobs, prepared, cpus, gpus, desc, progress, on_done)


def _produce_locked(store: TrajectoryStore, jobs: list[ExpertJob], prepared: Prepared, cpus: float, gpus: float,
                    desc: str, progress: bool, on_done) -> list[dict]:
    """:func:`produce` with its keys locked: nobody else writes them now, so temp files are debris."""
    for key in {j.key for j in jobs}:
        store.clean_temp(key)
    todo = missing_jobs(store, jobs)
    if not todo:
        return []
    size = pool_size(len(todo), cpus, gpus)
    b = prepared.bundle
    data_ref = ray.put({"train_x": b.train_x, "train_y": b.train_y, "val_x": b.val_x, "val_y": b.val_y})
    actors = [
        ExpertWorker.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy="DEFAULT").remote(
            data_ref, prepared.spec, store.root, gpus > 0, max(1, int(cpus))
        )
        for _ in range(size)
    ]
    actor_pool = ActorPool(actors)
    summaries = []
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="expert", disable=not progress)
    t0, present = time.perf_counter(), len(jobs) - len(todo)
    progress_log.info("%s: %d/%d present, training %d on %d actors", desc, present, len(jobs), len(todo), size)
    try:
        for summary in actor_pool.map_unordered(lambda a, js: a.run.remote(js[0], **js[1]), shared_fields(todo)):
            summaries.append(summary)
            bar.set_postfix(val_acc=f"{summary['final_val_acc'] * 100:.1f}%")
            bar.update(1)
            left = time_left(len(summaries), len(todo), time.perf_counter() - t0)
            progress_log.info("%s: %d/%d (expert %d: val %.1f%%)%s", desc, present + len(summaries), len(jobs),
                              summary["index"], summary["final_val_acc"] * 100, f", {left}" if left else "")
            if on_done is not None:
                on_done(summary)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return sorted(summaries, key=lambda s: s["index"])


def stage1_experts(cfg: PddConfig, prepared: Prepared, progress: bool = True, on_done=None) -> tuple[str, list[dict]]:
    """Make sure every stage-1 expert of ``cfg`` exists in its store; returns (key, new summaries)."""
    store = TrajectoryStore(expert_store_root(cfg))
    jobs = stage1_jobs(cfg, prepared)
    summaries = produce(store, jobs, prepared, cfg.experts.cpus, cfg.experts.gpus, "experts", progress, on_done)
    return jobs[0].key, summaries


def expert_store_root(cfg: PddConfig) -> str:
    """``experts.storage`` or ``<storage>/experts``: shared by every run with the same settings."""
    if cfg.experts.storage:
        from pdd_ray.config import absolute_storage

        return absolute_storage(cfg.experts.storage)
    return f"{cfg.storage_root}/experts"
