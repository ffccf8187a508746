"""AlexNet as in the dataset-distillation benchmarks, adapted to any image size from 8 up.

Deviations from the DC-benchmark version, both so one network serves 8x8 to 64x64 inputs:
a max-pool is skipped when the feature map is already smaller than 2x2, and an adaptive
average pool to 1x1 replaces the size-dependent flatten, so the classifier is always
``Linear(192, classes)``. The benchmark AlexNet has no normalisation layers, so ``norm``
(and ``width``, ``depth``, ``pooling``) are ignored here.
"""

from __future__ import annotations

from torch import nn

from pdd_ray.models.head import PooledClassifier

# (out_channels, kernel, padding, pool_after)
ALEXNET_CFG: tuple[tuple[int, int, int, bool], ...] = (
    (128, 5, 2, True),
    (192, 5, 2, True),
    (256, 3, 1, False),
    (192, 3, 1, False),
    (192, 3, 1, True),
)


class AlexNet(PooledClassifier):
    """Five ReLU convs with up to three max-pools, global average pooling, a linear head."""

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, side = channels, image_size
        for out_ch, kernel, pad, pool in ALEXNET_CFG:
            layers += [nn.Conv2d(in_ch, out_ch, kernel, padding=pad), nn.ReLU(inplace=True)]
            if pool and side >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                side //= 2
            in_ch = out_ch
        self._set_head(layers, in_ch, num_classes)
