"""Forgetting-score discarding: counts, the kept subset, zero-cost recording, the real pool."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.errors import PddError
from pdd_ray.forgetting import (
    aggregate,
    counts_path,
    drop_count,
    forgetting_counts,
    kept_indices,
    read_counts,
)
from pdd_ray.training import TrainRecipe, train


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_counts_on_a_hand_made_matrix():
    correct = np.array(
        [  # epochs x examples
            [1, 1, 0, 0, 0, 1],
            [1, 0, 0, 1, 0, 1],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 0, 0, 1, 0],
        ],
        dtype=bool,
    )
    # 0: always right; 1: forgotten twice; 2: never learned -> epochs + 1; 3: learned then
    # forgotten once; 4: learned in the last epoch only; 5: forgotten once and never relearned
    assert forgetting_counts(correct).tolist() == [0, 2, 5, 1, 0, 1]
    assert forgetting_counts(correct).dtype == np.int64
    assert aggregate([forgetting_counts(correct), np.arange(6)]).tolist() == [0, 3, 7, 4, 4, 6]
    with pytest.raises(PddError, match="different shapes"):
        aggregate([np.zeros(3), np.zeros(4)])
    with pytest.raises(PddError, match="matrix"):
        forgetting_counts(np.zeros(5, dtype=bool))


def test_kept_indices_drop_exactly_the_lowest_counts_deterministically():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=101)  # many ties
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.99):
        kept = kept_indices(counts, fraction, seed=7)
        drop = math.floor(fraction * 101)
        assert kept.shape == (101 - drop,)
        assert np.all(np.diff(kept) > 0)  # sorted, unique
        dropped = np.setdiff1d(np.arange(101), kept)
        assert dropped.shape == (drop,)
        if drop:
            assert counts[dropped].max() <= counts[kept].min()  # only lowest-count ones go
        assert np.array_equal(kept, kept_indices(counts, fraction, seed=7))
    # ties are broken by the seed: some seed picks a different subset among the tied ones
    base = kept_indices(counts, 0.3, seed=7)
    assert any(not np.array_equal(base, kept_indices(counts, 0.3, seed=s)) for s in range(1, 5))
    # exact decimal floor: 0.29 * 100 is 28.999... in binary floating point
    assert drop_count(0.29, 100) == 29 and kept_indices(np.zeros(100), 0.29, 0).shape == (71,)
    assert kept_indices(np.zeros(0), 0.5, 0).shape == (0,)


def test_stratified_discard_never_empties_a_class():
    # class 1 holds every easy example: a global ranking at 50 % would drop all of it
    labels = np.array([0] * 10 + [1] * 10)
    counts = np.array([5] * 10 + [0] * 10)
    assert set(labels[kept_indices(counts, 0.5, seed=0)]) == {0}  # the unstratified discard empties class 1
    kept = kept_indices(counts, 0.5, seed=0, labels=labels)
    assert np.bincount(labels[kept]).tolist() == [5, 5]  # each class loses its own easiest half
    kept = kept_indices(counts, 0.95, seed=0, labels=labels, min_per_class=3)
    assert np.bincount(labels[kept]).tolist() == [3, 3]  # floor(0.95 * 10) = 9 would leave 1
    uneven = np.array([0] * 3 + [1] * 17)
    kept = kept_indices(np.arange(20), 0.9, seed=0, labels=uneven, min_per_class=1)
    assert np.bincount(uneven[kept]).tolist() == [1, 2]
    assert kept.tolist() == [2, 18, 19]  # the highest counts of each class stay


def test_methods_refuse_a_real_pool_with_an_empty_class():
    from pdd_ray.distill.methods.base import check_real_classes

    check_real_classes(torch.tensor([0, 1, 2, 2]), 3, "stage 2")
    with pytest.raises(PddError) as err:
        check_real_classes(torch.tensor([0, 2, 2]), 3, "stage 2")
    msg = str(err.value)
    assert "\n" not in msg and "stage 2" in msg and "[1]" in msg and "discard_min_per_class" in msg


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), True, "0.3"])
def test_bad_fractions_are_one_line_errors(bad):
    with pytest.raises(PddError) as err:
        kept_indices(np.zeros(10), bad, 0)
    msg = str(err.value)
    assert "\n" not in msg and repr(bad) in msg and "[0, 1)" in msg


def test_recording_changes_neither_weights_nor_rng_stream(one_thread):
    torch.manual_seed(0)
    x = torch.randn(50, 3, 8, 8)
    y = torch.randint(0, 4, (50,))
    recipe = TrainRecipe(epochs=3, lr=0.1, batch_size=16, augment="crop_scale_rotate")

    def run(hook):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        g = torch.Generator().manual_seed(2)
        train(model, x, y, recipe, g, on_batch=hook)
        return [p.detach().clone() for p in model.parameters()], torch.randint(0, 2**31, (4,), generator=g)

    seen = torch.zeros(3, 50, dtype=torch.int64)

    def hook(e, idx, correct):
        assert correct.dtype == torch.bool and correct.shape == idx.shape
        seen[e, idx] += 1

    plain, plain_next = run(None)
    hooked, hooked_next = run(hook)
    for a, b in zip(plain, hooked):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit-identical
    assert torch.equal(plain_next, hooked_next)  # the generator was drawn from identically
    assert torch.equal(seen, torch.ones(3, 50, dtype=torch.int64))  # every example once per epoch


def test_discard_fraction_config_errors():
    with pytest.raises(PddError) as err:
        load_config("digits", ["distill.discard_fraction=1.5"])
    msg = str(err.value)
    assert "\n" not in msg and "distill.discard_fraction" in msg and "1.5" in msg
    with pytest.raises(PddError, match="distill.discard_from_stage"):
        load_config("digits", ["distill.discard_from_stage=1"])
    cfg = load_config("digits")
    assert cfg.distill.discard_fraction == 0.0 and cfg.distill.discard_from_stage == 2


def test_stage1_counts_and_transition_real_pool(ray_session, tmp_path, tiny_overrides):
    from pdd_ray.distill import transition
    from pdd_ray.distill.transition import real_indices
    from pdd_ray.evaluation import StageSet, random_subset
    from pdd_ray.experts.produce import base_settings, expert_store_root, produce, stage1_experts
    from pdd_ray.experts.store import TrajectoryStore, store_key
    from pdd_ray.prepare import prepare

    overrides = tiny_overrides(str(tmp_path / "out"))
    cfg = load_config("digits", overrides + ["distill.discard_fraction=0.3"])
    cfg0 = load_config("digits", overrides)
    prepared = prepare(cfg)
    b = prepared.bundle
    n = b.train_x.shape[0]
    key, _ = stage1_experts(cfg, prepared, progress=False)
    assert stage1_experts(cfg0, prepared, progress=False) == (key, [])  # same stage-1 key: nothing retrained
    store = TrajectoryStore(expert_store_root(cfg))
    for j in range(cfg.experts.num_experts):
        counts = read_counts(store, key, j)
        assert counts.shape == (n,)
        assert counts.min() >= 0 and counts.max() <= cfg.experts.epochs + 1

    assert real_indices(cfg, prepared, 1) is None and real_indices(cfg0, prepared, 2) is None
    pool = real_indices(cfg, prepared, 2)
    by_class = [int((b.train_y == c).sum()) for c in range(b.num_classes)]
    assert pool.dtype == torch.int64 and pool.shape == (n - sum(math.floor(0.3 * m) for m in by_class),)
    total = aggregate([read_counts(store, key, j) for j in range(cfg.experts.num_experts)])
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[pool.numpy()] = True
    for c in range(b.num_classes):  # per class: exactly its easiest 30 % left out
        in_c = (b.train_y == c).numpy()
        assert (~kept_mask & in_c).sum() == math.floor(0.3 * by_class[c])
        assert total[~kept_mask & in_c].max() <= total[kept_mask & in_c].min()
    assert torch.equal(pool, real_indices(cfg, prepared, 3))  # same subset at every later stage

    ux, uy = random_subset(b, 1, 123)
    union = [StageSet(ux, uy, lr=0.01, epochs=5)]
    jobs = transition.transition_jobs(cfg, prepared, 1, key, union)
    jobs0 = transition.transition_jobs(cfg0, prepared, 1, key, union)
    assert len(jobs) == cfg.experts.num_experts
    assert all(torch.equal(j.real_indices, pool) for j in jobs) and all(j.real_indices is None for j in jobs0)
    assert jobs[0].key != jobs0[0].key  # the kept subset is part of the key
    # the key follows exactly what the transition experts consume
    def tkey(c, u=union):
        return transition.transition_jobs(c, prepared, 1, key, u)[0].key

    assert tkey(cfg0) == jobs0[0].key  # deterministic
    assert tkey(load_config("digits", overrides + ["distill.discard_from_stage=3"])) == jobs0[0].key  # unread at 0
    assert tkey(load_config("digits", overrides + ["evaluation.epochs_per_stage=9"])) == jobs0[0].key
    assert tkey(load_config("digits", overrides + ["evaluation.weight_decay=0.001"])) != jobs0[0].key  # warm-up
    assert tkey(load_config("digits", overrides + ["distill.transition_syn_epochs=2"])) != jobs0[0].key
    assert tkey(cfg0, [StageSet(ux, uy, lr=0.02, epochs=5)]) != jobs0[0].key  # α_k
    moved = ux.clone()
    moved[0, 0, 0, 0] += 1e-3
    assert tkey(cfg0, [StageSet(moved, uy, lr=0.01, epochs=5)]) != jobs0[0].key  # one pixel of S_<=k

    # one transition expert really trains on the kept subset only
    produce(store, jobs[:1], prepared, progress=False)
    t_counts = read_counts(store, jobs[0].key, 0)
    outside = np.setdiff1d(np.arange(n), pool.numpy())
    assert (t_counts[outside] == -1).all() and (t_counts[pool.numpy()] >= 0).all()

    # a store written before counts existed: a one-line error naming the fix
    for j in range(cfg.experts.num_experts):
        (tmp_path / "out" / "experts" / counts_path(key, j)).unlink()
    with pytest.raises(PddError) as err:
        real_indices(cfg, prepared, 2)
    assert "\n" not in str(err.value) and "fresh store" in str(err.value)
