"""Transitions between stages, and the real examples each stage may use.

Expert j of stage k+1 starts from expert j's initial weights, trains on the synthetic union
S_<=k with α_k, then on real data; all experts run in parallel (:func:`produce`). With
forgetting-score discarding the real data is a per-class subset (:func:`real_indices`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import torch

from pdd_ray.config import PddConfig
from pdd_ray.distill.identity import transition_real_recipe, warmup_recipe
from pdd_ray.distill.records import record_real_examples
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet
from pdd_ray.experts.produce import (
    ExpertJob,
    base_settings,
    expert_store_root,
    model_meta,
    produce,
    stage1_key,
)
from pdd_ray.experts.store import TrajectoryStore, store_key
from pdd_ray.experts.trajectory import Warmup
from pdd_ray.forgetting import aggregate, kept_indices, read_counts
from pdd_ray.prepare import Prepared
from pdd_ray.seeding import derive_seed
from pdd_ray.soft_labels import union_targets


def real_indices(cfg: PddConfig, prepared: Prepared, stage: int) -> torch.Tensor | None:
    """Indices into ``prepared.bundle.train_x`` that stage ``stage`` uses as real data; None = all.

    From ``distill.discard_from_stage`` on, each class's ``floor(distill.discard_fraction * n_c)``
    examples with the fewest forgetting events, summed over the config's stage-1 experts (which
    must exist), are left out, keeping at least ``distill.discard_min_per_class`` per class
    (:mod:`pdd_ray.forgetting`). Deterministic for a seed, so every
    stage and every call sees the same sorted subset.
    """
    d = cfg.distill
    if d.discard_fraction == 0 or stage < d.discard_from_stage:
        return None
    store = TrajectoryStore(expert_store_root(cfg))
    key = stage1_key(cfg, prepared)
    n = prepared.bundle.train_x.shape[0]
    counts = []
    for j in range(cfg.experts.num_experts):
        if not store.exists(key, j):
            raise PddError(f"distill.discard_fraction needs the stage-1 experts' forgetting counts, but expert {j} "
                           f"is missing under {store.root}/{key}; run `pdd-ray experts` first")
        c = read_counts(store, key, j)
        if c is None:
            raise PddError(f"distill.discard_fraction = {d.discard_fraction} needs forgetting counts, but the stage-1 "
                           f"experts in {store.root}/{key} predate them; re-run the experts with a fresh store "
                           "(a new experts.storage, or delete that folder)")
        if c.shape[0] != n:
            raise PddError(f"forgetting counts of expert {j} in {store.root}/{key} cover {c.shape[0]} examples, "
                           f"the training set has {n}; delete that folder and re-run `pdd-ray experts`")
        counts.append(c)
    kept = kept_indices(aggregate(counts), d.discard_fraction, derive_seed(cfg.seed, "forgetting-ties"),
                        labels=prepared.bundle.train_y.numpy(), min_per_class=d.discard_min_per_class)
    return torch.from_numpy(kept)


def real_examples(cfg: PddConfig, prepared: Prepared, stage: int) -> int:
    """How many real training examples stage ``stage`` uses (the size of :func:`real_indices`)."""
    indices = real_indices(cfg, prepared, stage)
    return int(prepared.bundle.train_x.shape[0] if indices is None else indices.shape[0])


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
    indices = real_indices(cfg, prepared, k + 1) if real.epochs > 0 else None  # forgetting-score discarding
    kept = ({"real_pool": {"fraction": d.discard_fraction, "size": int(indices.numel()), "kept": _digest(indices)}}
            if indices is not None else {})
    union_digest = store_key({"images": _digest(ux), "labels": _digest(uy), "alpha": alpha})
    key = store_key({**base_settings(cfg, prepared), "kind": "transition", "stage": k + 1, "prev": prev_key,
                     "union": union_digest, "warmup": asdict(warm), "recipe": asdict(real), **kept})
    common = {**base_settings(cfg, prepared), **model_meta(prepared.spec), "optimizer": asdict(real), "stage": k + 1,
              "warmup": asdict(warm), "prev_key": prev_key, **kept}
    warmup = Warmup(ux, uy, warm)  # one object for every job: produce() puts it in the object store once
    return [
        ExpertJob(key=key, index=j, seed=derive_seed(cfg.seed, "transition", k + 1, j), recipe=real,
                  keep_epochs=reach + 1, meta={**common, "seed": derive_seed(cfg.seed, "transition", k + 1, j),
                                               "expert_index": j},
                  init_from=(prev_key, j) if prev_key else None, warmup=warmup, real_indices=indices)
        for j in prev
    ]


def _digest(t: torch.Tensor) -> str:
    """A short content digest of a tensor (part of the transition experts' store key)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_transition(cfg: PddConfig, prepared: Prepared, k: int, prev_key: str | None, union: list[StageSet],
                   progress: bool = True, directory=None, tracker=None) -> str:
    """Produce (or find) the experts of stage k+1 in parallel; returns their store key.

    With ``directory``, the number of real examples the new experts trained on is recorded
    in ``<directory>/real_examples.json`` (and on ``tracker``), see :func:`record_real_examples`.
    """
    jobs = transition_jobs(cfg, prepared, k, prev_key, union)
    store = TrajectoryStore(expert_store_root(cfg))
    produce(store, jobs, prepared, cfg.experts.cpus, cfg.experts.gpus, f"transition {k}->{k + 1}", progress)
    if directory is not None and jobs:  # the experts' real data (MTT) or the matched real batches (DM, IDC)
        indices = jobs[0].real_indices  # already selected for the experts' real epochs; else read the counts
        n = int(indices.numel()) if indices is not None else real_examples(cfg, prepared, k + 1)
        record_real_examples(directory, k + 1, n, prepared.bundle.train_x.shape[0], tracker, progress)
    return jobs[0].key
