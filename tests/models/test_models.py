"""Tests for pdd_ray.models: shapes, parameter counts, validation and the flat-param wrapper."""

from __future__ import annotations

import pytest
import torch

from pdd_ray.errors import PddError
from pdd_ray.models import (
    ARCHS,
    NORMS,
    POOLINGS,
    FlatModel,
    build_model,
    check_model_fits,
    default_depth,
)

SHAPES = [(1, 8), (3, 32), (1, 28), (3, 64)]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_public_constants() -> None:
    assert ARCHS == ("convnet", "resnet18", "vgg11", "alexnet")
    assert NORMS == ("instance", "batch", "none")
    assert POOLINGS == ("avg", "max")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels,size", SHAPES)
def test_forward_shape(arch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, channels, 7, size, width=8)
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "channels,size,depth,classes,expected",
    [(3, 32, 3, 10, 320_010), (3, 32, 3, 100, 504_420), (3, 64, 4, 200, 857_160)],
)
def test_convnet_param_counts(
    channels: int, size: int, depth: int, classes: int, expected: int
) -> None:
    model = build_model("convnet", channels, classes, size, width=128, depth=depth)
    assert n_params(model) == expected


def test_convnet_default_depth_used_and_one_channel_8x8() -> None:
    # depth unset at 8x8 -> 2 blocks -> 2x2 map; no extra padding for 1-channel inputs.
    model = build_model("convnet", 1, 10, 8, width=4)
    assert model.classifier.in_features == 4 * 2 * 2
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_convnet_norm_and_pooling_options(norm: str, pooling: str) -> None:
    model = build_model("convnet", 3, 5, 16, width=4, norm=norm, pooling=pooling)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("MaxPool2d" if pooling == "max" else "AvgPool2d") in kinds
    expected_norm = {"instance": "GroupNorm", "batch": "BatchNorm2d", "none": None}[norm]
    if expected_norm:
        assert expected_norm in kinds
    else:
        assert not kinds & {"GroupNorm", "BatchNorm2d"}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_convnet_channels_last_input() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", 3, 10, 16, width=8)
    x = torch.randn(2, 3, 16, 16)
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    torch.testing.assert_close(model(x_cl), model(x))


@pytest.mark.parametrize(
    "size,expected", [(8, 2), (16, 3), (28, 2), (32, 3), (64, 4)]
)
def test_default_depth(size: int, expected: int) -> None:
    assert default_depth(size) == expected


def test_check_model_fits_accepts_good_sizes() -> None:
    for arch in ARCHS:
        for size in (8, 28, 32, 64):
            check_model_fits(arch, size)
    check_model_fits("convnet", 8, 3)  # 8 -> 1 pixel is still fine
    check_model_fits("resnet18", 8, 9)  # depth only concerns the ConvNet


def test_unknown_arch_suggests_accepted_list() -> None:
    for call in (
        lambda: check_model_fits("resnet50", 32),
        lambda: build_model("resnet50", 3, 10, 32),
    ):
        with pytest.raises(PddError, match="resnet50") as err:
            call()
        assert all(a in str(err.value) for a in ARCHS)


def test_depth_too_deep() -> None:
    with pytest.raises(PddError, match="depth 4") as err:
        check_model_fits("convnet", 8, 4)
    assert "1..3" in str(err.value)
    with pytest.raises(PddError, match="depth 4"):
        build_model("convnet", 1, 10, 8, depth=4)
    with pytest.raises(PddError, match="depth 0"):
        build_model("convnet", 1, 10, 8, depth=0)


def test_image_size_too_small() -> None:
    with pytest.raises(PddError, match="image size 4"):
        check_model_fits("convnet", 4)
    with pytest.raises(PddError, match="image size 4"):
        build_model("alexnet", 3, 10, 4)
    with pytest.raises(PddError, match="image size 4"):
        default_depth(4)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_norm_pooling_width(arch: str) -> None:
    with pytest.raises(PddError, match="'layer'") as err:
        build_model(arch, 3, 10, 8, norm="layer")
    assert "instance" in str(err.value)
    with pytest.raises(PddError, match="'mean'"):
        build_model(arch, 3, 10, 8, pooling="mean")
    with pytest.raises(PddError, match="width = 0"):
        build_model(arch, 3, 10, 8, width=0)
    with pytest.raises(PddError, match="num_classes = 0"):
        build_model(arch, 3, 0, 8)


def test_error_messages_are_one_line() -> None:
    with pytest.raises(PddError) as err:
        check_model_fits("convnet", 8, 4)
    assert "\n" not in str(err.value)


# --- FlatModel ---------------------------------------------------------------------------


def _small_convnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("convnet", 1, 3, 8, width=4, depth=2)


def test_flat_layout() -> None:
    model = _small_convnet()
    fm = FlatModel(model)
    assert fm.names == [n for n, _ in model.named_parameters()]
    assert fm.shapes == [p.shape for p in model.parameters()]
    assert fm.numel == n_params(model)
    flat = fm.flatten()
    assert flat.shape == (fm.numel,) and flat.dtype == torch.float32
    assert not flat.requires_grad


def test_flatten_load_flat_round_trip() -> None:
    model, other = _small_convnet(0), _small_convnet(1)
    fm, fo = FlatModel(model), FlatModel(other)
    flat = fm.flatten()
    assert not torch.equal(flat, fo.flatten())
    fo.load_flat(flat)
    torch.testing.assert_close(fo.flatten(), flat, rtol=0, atol=0)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(other(x), model(x))
    # flatten is a copy: changing the module afterwards does not change it.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(fm.flatten(), flat)


def test_unflatten_views_share_storage() -> None:
    fm = FlatModel(_small_convnet())
    flat = fm.flatten().requires_grad_(True)
    parts = fm.unflatten(flat)
    assert list(parts) == fm.names
    assert all(parts[n].shape == s for n, s in zip(fm.names, fm.shapes))
    assert all(t.grad_fn is not None for t in parts.values())


def test_bad_flat_vector() -> None:
    fm = FlatModel(_small_convnet())
    with pytest.raises(PddError, match=str(fm.numel)):
        fm.load_flat(torch.zeros(fm.numel + 1))
    with pytest.raises(PddError):
        fm(torch.zeros(1, fm.numel), torch.randn(2, 1, 8, 8))


def test_flat_forward_matches_module_and_grads() -> None:
    model = _small_convnet()
    fm = FlatModel(model)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    flat = fm.flatten().requires_grad_(True)
    out = fm(flat, x)
    torch.testing.assert_close(out, model(x))

    loss_fn = torch.nn.functional.cross_entropy
    (g_flat,) = torch.autograd.grad(loss_fn(out, y), flat)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    g_module = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(g_flat, g_module)


def test_flat_forward_other_arch_matches_module() -> None:
    torch.manual_seed(0)
    model = build_model("alexnet", 1, 3, 8)
    x = torch.randn(2, 1, 8, 8)
    fm = FlatModel(model)
    torch.testing.assert_close(fm(fm.flatten(), x), model(x))


def test_second_order_gradient_reaches_images() -> None:
    """One unrolled SGD step, differentiated back to the images (trajectory matching)."""
    fm = FlatModel(_small_convnet())
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss_fn = torch.nn.functional.cross_entropy

    flat = fm.flatten().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(fm(flat, x), y), flat, create_graph=True)
    flat2 = flat - 0.1 * g
    x_eval = torch.randn(4, 1, 8, 8)
    loss2 = loss_fn(fm(flat2, x_eval), y)  # x reaches loss2 only through the SGD step
    loss2.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def _sliced(fm: FlatModel, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The previous ``unflatten``: one slice per parameter (kept here as the reference)."""
    out, offset = {}, 0
    for name, shape in zip(fm.names, fm.shapes):
        out[name] = flat[offset : offset + shape.numel()].reshape(shape)
        offset += shape.numel()
    return out


def test_split_unflatten_gives_the_sliced_second_order_gradients_bit_for_bit() -> None:
    """``unflatten`` splits the vector once (cheaper backward); an unrolled step's image and
    weight gradients must be identical to the per-parameter slicing it replaced."""
    from torch.func import functional_call

    fm = FlatModel(_small_convnet())
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    loss_fn = torch.nn.functional.cross_entropy

    def two_steps(views) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_(True)
        w0 = fm.flatten().requires_grad_(True)
        w = w0
        for _ in range(2):
            out = functional_call(fm.model, views(w), (xs,))
            (g,) = torch.autograd.grad(loss_fn(out, y), w, create_graph=True)
            w = w - 0.1 * g
        return list(torch.autograd.grad((w**2).sum(), [xs, w0]))

    split = two_steps(fm.unflatten)
    sliced = two_steps(lambda w: _sliced(fm, w))
    for a, b in zip(split, sliced):
        assert torch.equal(a, b)
    assert split[0].abs().sum() > 0
