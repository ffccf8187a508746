"""VGG-11 for cross-architecture evaluation, adapted so small images work.

The standard configuration has five 2x2 max-pools, which would shrink an 8x8 or 28x28 image
below one pixel; a pool is therefore skipped once the feature map is smaller than 2x2. An
adaptive average pool then maps whatever is left to 1x1 for ``Linear(512, classes)``.
Widths are the standard ones, so ``width``, ``depth`` and ``pooling`` are ignored; ``norm``
applies after every conv.
"""

from __future__ import annotations

from torch import nn

from pdd_ray.models.convnet import make_norm
from pdd_ray.models.head import PooledClassifier

# Numbers are 3x3 conv output channels; "M" is a 2x2 stride-2 max-pool.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(PooledClassifier):
    """VGG-11 features (conv + norm + ReLU, max-pools where they fit) and a linear head."""

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, side = channels, image_size
        for item in VGG11_CFG:
            if item == "M":
                if side < 2:  # already 1x1: another pool would leave nothing
                    continue
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                side //= 2
            else:
                out_ch = int(item)
                layers += [
                    nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
                    make_norm(norm, out_ch),
                    nn.ReLU(inplace=True),
                ]
                in_ch = out_ch
        self._set_head(layers, in_ch, num_classes)
