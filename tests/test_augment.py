"""Tests for pdd_ray.augment (Differentiable Siamese Augmentation)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from pdd_ray import augment
from pdd_ray.augment import DEFAULT_STRATEGY, FAMILIES, DiffAugment, DSAParams
from pdd_ray.errors import PddError

SHAPES = [(4, 1, 8, 8), (4, 3, 32, 32)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def only(family: str, **params: float) -> DiffAugment:
    """An augmenter that deterministically applies exactly one family."""
    return DiffAugment(family, DSAParams(**params), mode="all")


def rand(*shape: int, seed: int = 123, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# --------------------------------------------------------------------- shape / layout / grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_dtype_and_contiguous(family: str, shape: tuple[int, ...]) -> None:
    x = rand(*shape)
    out = only(family)(x, gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous()
    assert out.view(out.shape[0], -1).shape == (shape[0], math.prod(shape[1:]))
    assert not torch.equal(out, x)  # the family actually did something


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channels_last_input(family: str, shape: tuple[int, ...]) -> None:
    x = rand(*shape)
    x_cl = x.to(memory_format=torch.channels_last)
    out = only(family)(x_cl, gen())
    assert out.is_contiguous()
    out.view(out.shape[0], -1)
    torch.testing.assert_close(out, only(family)(x, gen()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_reach_pixels(family: str, shape: tuple[int, ...]) -> None:
    x = rand(*shape).requires_grad_()
    weights = rand(*shape, seed=7)
    (only(family)(x, gen()) * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_default_strategy_single_and_all_modes_run() -> None:
    x = rand(2, 3, 16, 16)
    for mode in ("single", "all"):
        out = DiffAugment(DEFAULT_STRATEGY, mode=mode)(x)  # global RNG path
        assert out.shape == x.shape and out.is_contiguous()


# --------------------------------------------------------------------- parameter ranges


def test_flip_is_identity_or_mirror_and_both_occur() -> None:
    x = rand(64, 3, 8, 8)
    out = only("flip")(x, gen())
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference: out[..., i, j] = img[..., i + dy, j + dx], zero where that is outside."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    out[..., max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = img[
        ..., max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)
    ]
    return out


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (64, 3, 32, 32)])
def test_crop_is_integer_shift_with_zero_fill(shape: tuple[int, ...]) -> None:
    n, c, h, w = shape
    x = torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(shape)  # all distinct, > 0
    out = only("crop")(x, gen())
    s = int(h * 0.125 + 0.5)
    found = []
    for i in range(n):
        matches = [
            (dy, dx)
            for dy in range(-s, s + 1)
            for dx in range(-s, s + 1)
            if torch.equal(out[i], shifted(x[i], dy, dx))
        ]
        assert len(matches) == 1, f"image {i} is not an integer shift within +-{s}"
        found.append(matches[0])
    assert len(set(found)) > 1  # per-image shifts
    # the full range [-s, s] is used on both axes (fixed seed, so this is deterministic)
    assert {dy for dy, _ in found} >= {-s, s} and {dx for _, dx in found} >= {-s, s}


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (64, 3, 32, 32)])
def test_cutout_zeroes_one_square_of_stated_side(shape: tuple[int, ...]) -> None:
    n, c, h, w = shape
    side = int(h * 0.5 + 0.5)
    x = torch.ones(shape)
    out = only("cutout")(x, gen())
    assert ((out == 0) | (out == 1)).all()
    unclipped = 0
    for i in range(n):
        holes = out[i] == 0
        assert (holes == holes[0]).all()  # same hole in every channel
        rows = holes[0].any(1).nonzero().flatten()
        cols = holes[0].any(0).nonzero().flatten()
        hh, ww = len(rows), len(cols)
        assert holes[0].sum() == hh * ww  # a solid rectangle
        assert rows[-1] - rows[0] + 1 == hh and cols[-1] - cols[0] + 1 == ww
        assert side // 2 <= hh <= side and side // 2 <= ww <= side
        touches = rows[0] == 0 or rows[-1] == h - 1 or cols[0] == 0 or cols[-1] == w - 1
        if not touches:
            assert (hh, ww) == (side, side)
            unclipped += 1
    assert unclipped > 0


def color_factors(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Recover per-image (brightness shift b, saturation factor f, contrast factor g).

    With the documented ops, z's image mean is x's plus b; deviations of per-pixel channel
    means from the image mean scale by g; deviations of channels from their pixel mean scale
    by f*g. Fit each per image by least squares and check the fit is exact (the op's form).
    """
    def pixel_dev(t: torch.Tensor) -> torch.Tensor:
        return t.mean(1, keepdim=True) - t.mean((1, 2, 3), keepdim=True)

    def channel_dev(t: torch.Tensor) -> torch.Tensor:
        return t - t.mean(1, keepdim=True)

    def fit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        k = (a * b).sum((1, 2, 3)) / (a * a).sum((1, 2, 3))
        torch.testing.assert_close(b, k.view(-1, 1, 1, 1) * a)
        return k

    b = z.mean((1, 2, 3)) - x.mean((1, 2, 3))
    g = fit(pixel_dev(x), pixel_dev(z))
    fg = fit(channel_dev(x), channel_dev(z))
    return b, fg / g, g


@pytest.mark.parametrize(
    "params",
    [DSAParams(), DSAParams(brightness=0.2, saturation=0.5, contrast=0.0)],
)
def test_color_factors_lie_in_documented_ranges(params: DSAParams) -> None:
    x = rand(256, 3, 6, 6, dtype=torch.float64)
    z = DiffAugment("color", params, mode="all")(x, gen())
    b, f, g = color_factors(x, z)
    lo_hi = {
        "b": (b, -params.brightness / 2, params.brightness / 2),
        "f": (f, 0.0, params.saturation),
        "g": (g, params.contrast, params.contrast + 1.0),
    }
    for name, (v, lo, hi) in lo_hi.items():
        assert v.min() >= lo - 1e-9 and v.max() <= hi + 1e-9, name
        span = hi - lo
        # uniform draws over 256 images cover both ends of the range
        assert v.min() < lo + 0.1 * span and v.max() > hi - 0.1 * span, name


def spy_thetas(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = F.affine_grid

    def spy(theta: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(theta.detach().clone())
        return real(theta, *args, **kwargs)

    monkeypatch.setattr(F, "affine_grid", spy)
    return seen


def test_rotate_angle_range(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_thetas(monkeypatch)
    only("rotate")(torch.ones(128, 1, 8, 8), gen())
    (theta,) = seen
    torch.testing.assert_close(theta[:, 0, 0], theta[:, 1, 1])
    torch.testing.assert_close(theta[:, 0, 1], -theta[:, 1, 0])
    assert (theta[:, :, 2] == 0).all()
    angle = torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))
    assert angle.abs().max() <= 15.0 + 1e-4
    assert angle.min() < -13 and angle.max() > 13


def test_scale_factor_range(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_thetas(monkeypatch)
    only("scale")(torch.ones(128, 1, 8, 8), gen())
    (theta,) = seen
    off_diagonal = torch.stack([theta[:, 0, 1], theta[:, 0, 2], theta[:, 1, 0], theta[:, 1, 2]])
    assert (off_diagonal == 0).all()
    sx, sy = theta[:, 0, 0], theta[:, 1, 1]
    for s in (sx, sy):
        assert s.min() >= 1 / 1.2 - 1e-6 and s.max() <= 1.2 + 1e-6
        assert s.min() < 0.86 and s.max() > 1.16
    assert not torch.equal(sx, sy)  # independent per axis


@pytest.mark.parametrize(
    "family,params", [("rotate", {"rotate_degrees": 0.0}), ("scale", {"scale_ratio": 1.0})]
)
def test_identity_draw_reproduces_input(family: str, params: dict[str, float]) -> None:
    # Catches align_corners mismatches: the identity affine must land exactly on pixel centres.
    x = rand(3, 3, 16, 16)
    torch.testing.assert_close(only(family, **params)(x, gen()), x, atol=1e-5, rtol=0)


def test_rotate_constant_image_keeps_centre_and_only_loses_corners() -> None:
    n = 32
    out = only("rotate")(torch.ones(n, 1, 33, 33), gen())
    coords = torch.linspace(-1, 1, 33)
    radius = torch.sqrt(coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2)
    disk = radius <= 1.0  # any rotation maps the inscribed disk inside the image
    torch.testing.assert_close(out[:, 0][:, disk], torch.ones(n, int(disk.sum())))
    assert (out[:, 0, 16, 16] == 1).all()
    assert (out[:, 0][:, ~disk] < 1 - 1e-3).any()  # corners do get cut off
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()


# --------------------------------------------------------------------- randomness / Siamese


@pytest.mark.parametrize("mode", ["single", "all"])
def test_same_seed_identical_different_seed_differs(mode: str) -> None:
    aug = DiffAugment(DEFAULT_STRATEGY, mode=mode)
    x = rand(8, 3, 16, 16)
    torch.testing.assert_close(aug(x, gen(5)), aug(x, gen(5)), rtol=0, atol=0)
    assert any(not torch.equal(aug(x, gen(5)), aug(x, gen(s))) for s in range(6, 9))


def test_equal_seeds_pair_transforms_across_different_batches() -> None:
    # Siamese pairing by seed: every geometric family is linear, so if batch b = 2 * batch a
    # gets the same transforms, its output is exactly 2 * a's output.
    aug = DiffAugment("crop_cutout_flip_scale_rotate", mode="all")
    a = rand(8, 3, 16, 16)
    torch.testing.assert_close(aug(2 * a, gen(3)), 2 * aug(a, gen(3)))


@pytest.mark.parametrize("family", FAMILIES)
def test_per_image_vs_shared(family: str) -> None:
    x = rand(1, 3, 16, 16).expand(16, 3, 16, 16).contiguous()
    aug = only(family)
    per_image = aug(x, gen(1))
    assert any(not torch.equal(per_image[i], per_image[0]) for i in range(1, 16))
    shared = aug(x, gen(1), shared=True)
    for i in range(1, 16):
        assert torch.equal(shared[i], shared[0])


# --------------------------------------------------------------------- strategy / mode / errors


@pytest.mark.parametrize("strategy", ["none", ""])
def test_none_strategy_is_identity(strategy: str) -> None:
    aug = DiffAugment(strategy)
    assert not aug.enabled
    x = rand(2, 1, 8, 8)
    assert torch.equal(aug(x, gen()), x)
    assert DiffAugment().enabled and DiffAugment("flip").enabled


@pytest.mark.parametrize(
    "strategy,bad", [("colour", "'colour'"), ("color_bogus", "'bogus'"), ("crop__flip", "''")]
)
def test_unknown_family_raises(strategy: str, bad: str) -> None:
    with pytest.raises(PddError) as err:
        DiffAugment(strategy)
    assert bad in str(err.value)
    assert all(fam in str(err.value) for fam in FAMILIES)  # lists what is accepted


def test_bad_mode_params_and_inputs_raise() -> None:
    with pytest.raises(PddError, match="'S'"):
        DiffAugment("color", mode="S")
    with pytest.raises(PddError, match="repeats"):
        DiffAugment("flip_flip")
    with pytest.raises(PddError, match=r"flip_p=1\.5"):
        DSAParams(flip_p=1.5)
    with pytest.raises(PddError, match="scale_ratio=0.5"):
        DSAParams(scale_ratio=0.5)
    aug = DiffAugment("flip")
    with pytest.raises(PddError, match=r"\(3, 8, 8\)"):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(PddError, match="torch.int64"):
        aug(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(PddError, match="generator"):
        aug(torch.zeros(1, 1, 8, 8), generator=42)  # type: ignore[arg-type]


def test_single_mode_picks_each_family_roughly_uniformly(monkeypatch: pytest.MonkeyPatch) -> None:
    counts: Counter[str] = Counter()
    for fam, op in list(augment._FAMILY_OPS.items()):
        def counted(x, draws, params, fam=fam, op=op):  # type: ignore[no-untyped-def]
            counts[fam] += 1
            return op(x, draws, params)

        monkeypatch.setitem(augment._FAMILY_OPS, fam, counted)
    aug = DiffAugment(DEFAULT_STRATEGY, mode="single")
    g, x, calls = gen(11), torch.ones(1, 1, 8, 8), 600
    for _ in range(calls):
        aug(x, g)
    assert sum(counts.values()) == calls  # exactly one family per call
    assert set(counts) == set(FAMILIES)
    assert all(60 <= counts[f] <= 140 for f in FAMILIES), counts


def test_all_mode_applies_every_family_in_strategy_order(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    for fam, op in list(augment._FAMILY_OPS.items()):
        def logged(x, draws, params, fam=fam, op=op):  # type: ignore[no-untyped-def]
            order.append(fam)
            return op(x, draws, params)

        monkeypatch.setitem(augment._FAMILY_OPS, fam, logged)
    DiffAugment("rotate_flip_color", mode="all")(torch.ones(2, 3, 8, 8), gen())
    assert order == ["rotate", "flip", "color"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_output_on_gpu() -> None:
    x = rand(8, 3, 16, 16)
    aug = DiffAugment(DEFAULT_STRATEGY, mode="all")
    on_gpu = aug(x.cuda(), gen(2))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), aug(x, gen(2)), atol=1e-5, rtol=1e-5)
