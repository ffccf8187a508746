"""Build any supported network from a few plain settings, refusing bad ones up front.

Validation lives here (not in each architecture) so every caller - config checks, data
preparation, Ray workers - gets the same one-line :class:`PddError` before any tensor is
allocated, instead of a shape error from deep inside torch.
"""

from __future__ import annotations

import math

from torch import nn

from pdd_ray.errors import PddError
from pdd_ray.models.alexnet import AlexNet
from pdd_ray.models.convnet import ConvNet
from pdd_ray.models.resnet import ResNet18
from pdd_ray.models.vgg import VGG11
from pdd_ray.names import ARCHS, MIN_IMAGE_SIZE, NORMS, POOLINGS, max_convnet_depth



def _is_int(value: object) -> bool:
    # bool is an int subclass, but depth=True is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise PddError(f"{name} = {value!r} is invalid: a positive integer is accepted")


def _check_image_size(image_size: object) -> None:
    if not _is_int(image_size) or image_size < MIN_IMAGE_SIZE:  # type: ignore[operator]
        raise PddError(
            f"image size {image_size!r} is too small or not an integer: "
            f"models accept square images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )


def _check_arch(arch: object) -> None:
    if arch not in ARCHS:
        raise PddError(f"unknown model arch {arch!r}: accepted are {', '.join(ARCHS)}")


def default_depth(image_size: int) -> int:
    """ConvNet depth when the config leaves it unset.

    The usual choice in the literature: depth 3 for 32x32 (CIFAR), 4 for 64x64 (Tiny
    ImageNet), i.e. the final feature map is about 4x4. Tiny images (<= 16) keep a 2x2 map
    instead so there is still some depth: 8 -> 2, 16 -> 3, 28 -> 2, 32 -> 3, 64 -> 4.
    """
    _check_image_size(image_size)
    log = int(math.floor(math.log2(image_size)))
    return log - 1 if image_size <= 16 else log - 2


def check_model_fits(arch: str, image_size: int, depth: int | None = None) -> None:
    """Raise :class:`PddError` if ``arch`` cannot take ``image_size`` x ``image_size`` images.

    Only ConvNet has a size limit beyond the global minimum: each of its ``depth`` blocks
    halves the image, so it must keep at least one pixel. ``depth`` is ignored for the other
    architectures, which adapt their pooling to the size (so a ConvNet spec can be reused for
    cross-architecture evaluation unchanged).
    """
    _check_arch(arch)
    _check_image_size(image_size)
    if arch != "convnet" or depth is None:
        return
    max_depth = max_convnet_depth(image_size)
    if not _is_int(depth) or not 1 <= depth <= max_depth:  # type: ignore[operator]
        raise PddError(
            f"convnet depth {depth!r} does not fit {image_size}x{image_size} images: "
            f"accepted depth is 1..{max_depth} (each block halves the size), "
            f"or unset for the default {default_depth(image_size)}"
        )


def build_model(
    arch: str,
    channels: int,
    num_classes: int,
    image_size: int,
    *,
    width: int = 128,
    depth: int | None = None,
    norm: str = "instance",
    pooling: str = "avg",
) -> nn.Module:
    """A freshly initialised network (uses torch's global RNG: seed it first).

    ``width``, ``depth`` and ``pooling`` shape only the ConvNet; ResNet-18, VGG-11 and
    AlexNet keep their standard widths and adapt their pooling to ``image_size``.
    ``norm`` applies to ConvNet, ResNet-18 and VGG-11; AlexNet has no norm layers. All values
    are still validated for every arch, so a typo is caught whichever arch is chosen.
    """
    check_model_fits(arch, image_size, depth)
    _check_positive_int("channels", channels)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("width", width)
    if norm not in NORMS:
        raise PddError(f"unknown norm {norm!r}: accepted are {', '.join(NORMS)}")
    if pooling not in POOLINGS:
        raise PddError(f"unknown pooling {pooling!r}: accepted are {', '.join(POOLINGS)}")

    if arch == "convnet":
        d = default_depth(image_size) if depth is None else depth
        return ConvNet(channels, num_classes, image_size, width, d, norm, pooling)
    if arch == "resnet18":
        return ResNet18(channels, num_classes, norm)
    if arch == "vgg11":
        return VGG11(channels, num_classes, image_size, norm)
    return AlexNet(channels, num_classes, image_size)
