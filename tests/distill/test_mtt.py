"""Trajectory matching core: loss definition, gradient routing, frozen stages, averaging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdd_ray.augment import DiffAugment
from pdd_ray.errors import PddError
from pdd_ray.distill.match import MatchProblem, UnrollSpec, match, minibatch_schedule, unroll_loss
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.seeding import generator

SPEC = ModelSpec("convnet", 1, 3, 8, width=8, depth=2)


def _setup(seed=0, n_new=3, n_frozen=3):
    torch.manual_seed(seed)
    fm = FlatModel(build_seeded(SPEC, 1))
    start = fm.flatten()
    target = start + 0.05 * torch.randn_like(start)
    new_x = torch.randn(n_new, 1, 8, 8, requires_grad=True)
    new_y = torch.arange(n_new) % 3
    frozen_x = torch.randn(n_frozen, 1, 8, 8)
    frozen_y = torch.arange(n_frozen) % 3
    alpha = torch.tensor(0.01, requires_grad=True)
    return fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha


def test_minibatch_schedule_covers_each_permutation():
    batches = minibatch_schedule(6, 4, 3, generator(0))
    assert [len(b) for b in batches] == [4, 2, 4]  # the short last chunk of a permutation is kept
    assert sorted(torch.cat(batches[:2]).tolist()) == list(range(6))  # ... so a pass sees every image once
    # 7 images, batch 3: three passes of 3 + 3 + 1 see every image exactly three times
    counts = torch.bincount(torch.cat(minibatch_schedule(7, 3, 9, generator(2))), minlength=7)
    assert counts.tolist() == [3] * 7
    # batch larger than the set is clipped to the set
    assert len(minibatch_schedule(3, 10, 1, generator(0))[0]) == 3
    # a full pass over a permutation sees every image once
    seen = torch.cat(minibatch_schedule(6, 3, 2, generator(1)))
    assert sorted(seen.tolist()) == list(range(6))


def test_loss_matches_a_direct_mtt_unroll():
    """P = 1 (nothing frozen) is plain MTT: compare with an independent unroll written with autograd
    on the module's own parameters."""
    fm, start, target, _, _, new_x, new_y, alpha = _setup(n_frozen=0)
    empty_x, empty_y = new_x[:0].detach(), new_y[:0]
    dsa = DiffAugment("none")
    loss = unroll_loss(MatchProblem(fm, start, target, empty_x, empty_y, new_x, new_y), alpha, UnrollSpec(4, 3, dsa), generator(5))

    # reference: same minibatch order (batch 3 == all images, so order only permutes), module-based steps
    w = start.clone().requires_grad_(True)
    for idx in minibatch_schedule(3, 3, 4, generator(5)):
        params = fm.unflatten(w)
        out = torch.func.functional_call(fm.model, params, (new_x[idx],))
        g, = torch.autograd.grad(F.cross_entropy(out, new_y[idx]), w, create_graph=True)
        w = w - alpha * g
    ref = ((w - target) ** 2).sum() / ((start - target) ** 2).sum()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    # zero steps' worth of learning (alpha = 0) leaves the student at the start: loss exactly 1
    zero = unroll_loss(MatchProblem(fm, start, target, empty_x, empty_y, new_x, new_y), torch.tensor(0.0), UnrollSpec(2, 3, dsa), generator(0))
    assert torch.isclose(zero, torch.tensor(1.0))


def test_gradients_reach_new_images_and_alpha_only():
    fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha = _setup()
    frozen_before = frozen_x.clone()
    res = match(MatchProblem(fm, start, target, frozen_x, frozen_y, new_x, new_y), alpha, UnrollSpec(3, 4, DiffAugment("crop_scale_rotate")), generator(0))
    assert res.grad_images.shape == new_x.shape
    assert torch.isfinite(res.grad_images).all() and res.grad_images.abs().sum() > 0
    assert res.grad_alpha.shape == () and torch.isfinite(res.grad_alpha) and res.grad_alpha != 0
    # frozen stages are constants: no gradient is even defined for them, and they do not change
    assert frozen_x.grad is None and not frozen_x.requires_grad
    assert torch.equal(frozen_x, frozen_before)


def test_a_gradient_step_on_images_lowers_the_matching_loss():
    fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha = _setup(n_frozen=0)
    # a target the student can reach: where a few SGD steps on other images would lead
    empty_x, empty_y = new_x[:0].detach(), new_y[:0]
    dsa = DiffAugment("none")

    def loss_at(x):
        return unroll_loss(MatchProblem(fm, start, target, empty_x, empty_y, x, new_y), alpha, UnrollSpec(3, 3, dsa), generator(0))

    x = new_x.detach().clone().requires_grad_(True)
    before = loss_at(x)
    g, = torch.autograd.grad(before, x)
    after = loss_at((x - 1e-2 * g / g.norm()).detach())
    assert after < before


def _average_in_group(rank: int, world: int, init: str, out: str) -> None:
    """One process of a real gloo group: averages its own matching gradient with its peers'."""
    import torch.distributed as dist

    from pdd_ray.distill.stage import _all_average

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha = _setup()
        res = match(MatchProblem(fm, start, target, frozen_x, frozen_y, new_x, new_y), alpha, UnrollSpec(2, 3, DiffAugment("none")), generator(1 + rank))  # each rank its own sample
        avg_x, avg_a = _all_average([res.grad_images, res.grad_alpha.reshape(1)])
        torch.save({"x": avg_x.clone(), "a": avg_a.clone()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_average_of_two_samples_is_mean_of_gradients(tmp_path):
    """What the all-reduce computes, in a real two-process gloo group: the mean of the
    per-process matching gradients (not their sum, not one of them), reshaped back."""
    import torch.multiprocessing as mp

    from pdd_ray.distill.stage import _all_average

    fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha = _setup()
    dsa = DiffAugment("none")
    a = match(MatchProblem(fm, start, target, frozen_x, frozen_y, new_x, new_y), alpha, UnrollSpec(2, 3, dsa), generator(1))
    b = match(MatchProblem(fm, start, target, frozen_x, frozen_y, new_x, new_y), alpha, UnrollSpec(2, 3, dsa), generator(2))
    assert not torch.allclose(a.grad_images, b.grad_images)  # two different samples
    assert torch.equal(_all_average([a.grad_images])[0], a.grad_images)  # no process group: identity

    out = str(tmp_path / "avg")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_average_in_group, args=(2, init, out), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["x"].shape == a.grad_images.shape
        torch.testing.assert_close(got["x"], (a.grad_images + b.grad_images) / 2, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got["a"][0], (a.grad_alpha + b.grad_alpha) / 2, rtol=1e-5, atol=1e-10)


def test_conditioned_pool_closes_the_files_it_opened(tmp_path):
    """A stage worker reads up to one store file per expert; closing the method must close them
    all (on a long-lived Ray worker they would stay open as memory maps or remote handles)."""
    import numpy as np


    from pdd_ray.distill.methods.base import Conditioning, ConditioningNets
    from pdd_ray.experts.store import TrajectoryStore

    store = TrajectoryStore(str(tmp_path))
    for j in range(3):
        store.write("k", j, np.full((2, 4), j, dtype=np.float32), {"seed": j})
    pool = ConditioningNets(Conditioning(str(tmp_path), "k", [0, 1, 2]))
    assert float(pool.weights(1, 1, torch.device("cpu"))[0]) == 1.0
    assert float(pool.weights(2, 0, torch.device("cpu"))[0]) == 2.0
    opened = list(pool._readers.values())
    assert len(opened) == 2
    pool.close()
    for reader in opened:
        with pytest.raises(PddError, match="is closed"):
            reader.params(0)
    assert float(pool.weights(1, 0, torch.device("cpu"))[0]) == 1.0  # reopened on demand after a close
    pool.close()
