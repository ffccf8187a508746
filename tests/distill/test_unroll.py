"""Memory-bounded unrolls: "checkpoint" must reproduce "full" exactly, "tesla" only approximately.

The exactness checks matter because a reverse pass written by hand can silently drop a term
(a missed Hessian product, a DSA draw replayed with the wrong state) and still produce a
plausible-looking gradient; only a comparison against the autograd unroll catches that.
"""

from __future__ import annotations

import pytest
import torch

from pdd_ray.augment import DiffAugment
from pdd_ray.distill.match import UNROLLS, MatchProblem, UnrollSpec, match, match_many, unroll_loss
from pdd_ray.errors import PddError
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.seeding import generator

SPEC = ModelSpec("convnet", 1, 3, 8, width=8, depth=2)
N_FROZEN, N_NEW, BATCH = 4, 3, 3  # union of 7 in batches of 3: 6 steps use 3 permutations

DSAS = [
    ("none", "single"),
    ("crop_scale_rotate", "single"),
    ("color_crop_cutout_flip_scale_rotate", "single"),
    ("color_crop_cutout_flip_scale_rotate", "all"),  # every family's draws replayed each step
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation, which on a busy
    2-core machine turns a 0.2 s unroll into several seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    fm = FlatModel(build_seeded(SPEC, 1))
    start = fm.flatten()
    target = start + 0.05 * torch.randn_like(start)
    frozen_x = torch.randn(N_FROZEN, 1, 8, 8)
    frozen_y = torch.arange(N_FROZEN) % 3
    new_x = torch.randn(N_NEW, 1, 8, 8, requires_grad=True)
    new_y = torch.arange(N_NEW) % 3
    # a large step size makes the Hessian coupling between steps clearly visible
    alpha = torch.tensor(0.2, requires_grad=True)
    return fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha


def _run(unroll: str, steps: int, dsa: DiffAugment, seed: int = 7, setup=None):
    """match(...) in one mode; returns the result and the generator afterwards."""
    fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha = setup or _setup()
    g = generator(seed)
    res = match(MatchProblem(fm, start, target, frozen_x, frozen_y, new_x, new_y), alpha, UnrollSpec(steps, BATCH, dsa, unroll), g)
    return res, g


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Float-rounding agreement: relative 1e-4, absolute 1e-6 of the gradient's scale."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("strategy,mode", DSAS)
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_checkpoint_equals_full_unroll(strategy, mode, steps):
    dsa = DiffAugment(strategy, mode=mode)
    full, g_full = _run("full", steps, dsa)
    ckpt, g_ckpt = _run("checkpoint", steps, dsa)
    assert ckpt.loss == pytest.approx(full.loss, rel=1e-5)
    assert ckpt.grad_images.shape == full.grad_images.shape == (N_NEW, 1, 8, 8)
    assert full.grad_images.abs().max() > 0 and full.grad_alpha != 0
    assert _close(ckpt.grad_images, full.grad_images)
    assert _close(ckpt.grad_alpha, full.grad_alpha)
    assert ckpt.grad_alpha.shape == full.grad_alpha.shape == ()
    # the caller's generator is left exactly where "full" leaves it, so later draws agree
    assert torch.equal(g_ckpt.get_state(), g_full.get_state())
    assert not torch.equal(g_ckpt.get_state(), generator(7).get_state())


def test_checkpoint_replays_the_dsa_draw_of_each_step():
    """A different seed changes DSA draws and minibatches, so gradients must differ: the
    agreement above is not an accident of augmentation being a no-op."""
    dsa = DiffAugment("crop_scale_rotate")
    a, _ = _run("checkpoint", 3, dsa, seed=7)
    b, _ = _run("checkpoint", 3, dsa, seed=8)
    assert not torch.allclose(a.grad_images, b.grad_images)


@pytest.mark.parametrize("unroll", ["checkpoint", "tesla"])
def test_frozen_images_stay_constants(unroll):
    setup = _setup()
    frozen_x = setup[3]
    before = frozen_x.clone()
    res, _ = _run(unroll, 4, DiffAugment("crop_scale_rotate"), setup=setup)
    assert res.grad_images.shape == setup[5].shape
    assert frozen_x.grad is None and not frozen_x.requires_grad
    assert torch.equal(frozen_x, before)
    assert setup[5].grad is None  # gradients are returned, never accumulated into .grad


def test_tesla_is_exact_for_one_step():
    """With one inner step there is no later-step coupling to drop."""
    dsa = DiffAugment("crop_scale_rotate")
    exact, _ = _run("checkpoint", 1, dsa)
    tesla, _ = _run("tesla", 1, dsa)
    assert _close(tesla.grad_images, exact.grad_images)
    assert _close(tesla.grad_alpha, exact.grad_alpha)


@pytest.mark.parametrize("strategy", ["none", "crop_scale_rotate"])
def test_tesla_approximates_with_a_descent_direction(strategy):
    dsa = DiffAugment(strategy)
    setup = _setup()
    fm, start, target, frozen_x, frozen_y, new_x, new_y, alpha = setup
    exact, _ = _run("full", 6, dsa, setup=setup)
    tesla, g_tesla = _run("tesla", 6, dsa, setup=setup)
    _, g_full = _run("full", 6, dsa, setup=setup)
    assert tesla.loss == pytest.approx(exact.loss, rel=1e-5)  # the forward is exact
    assert torch.equal(g_tesla.get_state(), g_full.get_state())
    assert torch.isfinite(tesla.grad_images).all() and torch.isfinite(tesla.grad_alpha)
    # an approximation: it drops the prod(I - alpha H_j) terms, so it is not the exact gradient
    assert not torch.allclose(tesla.grad_images, exact.grad_images, rtol=1e-3, atol=0)
    assert not torch.allclose(tesla.grad_alpha, exact.grad_alpha, rtol=1e-3, atol=0)

    def exact_loss(x: torch.Tensor) -> float:
        loss = unroll_loss(MatchProblem(fm, start, target, frozen_x, frozen_y, x, new_y), alpha.detach(), UnrollSpec(6, BATCH, dsa), generator(7))
        return float(loss.detach())

    # a descent direction: positive inner product with the exact gradient, and a small step
    # along it lowers the exact loss
    assert float((tesla.grad_images * exact.grad_images).sum()) > 0
    x = new_x.detach()
    step = 1e-3 * tesla.grad_images / tesla.grad_images.norm()
    assert exact_loss(x - step) < exact_loss(x)


@pytest.mark.parametrize("bad", ["Full", "revolve", "", None, 3])
def test_unknown_unroll_mode_is_rejected(bad):
    with pytest.raises(PddError, match=r"unroll=.*expected one of"):
        _run(bad, 2, DiffAugment("none"))
    assert set(UNROLLS) == {"full", "checkpoint", "tesla"}


def _problems(k: int, new: torch.Tensor) -> tuple[FlatModel, list[MatchProblem]]:
    fm = FlatModel(build_seeded(SPEC, 0))
    torch.manual_seed(1)
    frozen_x, frozen_y = torch.randn(N_FROZEN, 1, 8, 8), torch.arange(N_FROZEN) % 3
    new_y = torch.arange(N_NEW) % 3
    out = []
    for _ in range(k):
        start = fm.flatten() + 0.05 * torch.randn(fm.numel)
        out.append(MatchProblem(fm, start, start + 0.02 * torch.randn(fm.numel), frozen_x, frozen_y, new, new_y))
    return fm, out


@pytest.mark.parametrize("strategy", ["none", "color_crop_cutout_flip_scale_rotate"])
def test_match_many_vmapped_equals_the_mean_of_one_by_one_matches(strategy):
    """K trajectories unrolled together (vmap) give the mean loss and gradients of K separate
    ``match`` calls with the same generators, and leave each generator where ``match`` would."""
    new = torch.randn(N_NEW, 1, 8, 8, requires_grad=True)
    _, problems = _problems(3, new)
    alpha = torch.tensor(0.05, requires_grad=True)
    spec = UnrollSpec(5, BATCH, DiffAugment(strategy), "full")
    gens_many = [generator(10 + j) for j in range(3)]
    gens_one = [generator(10 + j) for j in range(3)]
    many = match_many(problems, alpha, spec, gens_many)
    ones = [match(p, alpha, spec, g) for p, g in zip(problems, gens_one)]
    assert many.loss == pytest.approx(sum(r.loss for r in ones) / 3, rel=1e-5)
    torch.testing.assert_close(many.grad_images, sum(r.grad_images for r in ones) / 3, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(many.grad_alpha, sum(r.grad_alpha for r in ones) / 3, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ones[0].grad_images, ones[1].grad_images)  # the samples differ
    for a, b in zip(gens_many, gens_one):
        assert torch.equal(a.get_state(), b.get_state())


def test_match_many_checks_its_arguments():
    new = torch.randn(N_NEW, 1, 8, 8, requires_grad=True)
    _, problems = _problems(2, new)
    alpha = torch.tensor(0.05, requires_grad=True)
    with pytest.raises(PddError, match="2 problems and 1 generators"):
        match_many(problems, alpha, UnrollSpec(2, BATCH, DiffAugment("none"), "full"), [generator(0)])
    with pytest.raises(PddError, match="syn_steps=0"):
        match_many(problems, alpha, UnrollSpec(0, BATCH, DiffAugment("none"), "full"), [generator(0), generator(1)])
    with pytest.raises(PddError, match="unroll 'checkpoint'"):
        match_many(problems, alpha, UnrollSpec(2, BATCH, DiffAugment("none"), "checkpoint"), [generator(0), generator(1)])
