"""ConvNet: the small network dataset distillation is usually done with.

It is the architecture of DC/DSA/DM/MTT and PDD: ``depth`` blocks of
[3x3 conv -> norm -> ReLU -> 2x2 pool], then one linear classifier. It is small enough to
unroll many SGD steps through (trajectory matching) yet strong enough to be a fair judge.
"""

from __future__ import annotations

import torch
from torch import nn



def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer for ``norm`` over ``channels`` feature maps.

    "instance" is GroupNorm with one group per channel and affine weights: that is instance
    norm with learnable scale/shift, as in MTT, and unlike BatchNorm it has no running
    statistics, so a model is a pure function of its parameters (what trajectory matching
    needs). Callers validate ``norm`` first.
    """
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def make_pool(pooling: str) -> nn.Module:
    """A 2x2, stride-2 pooling layer (callers validate ``pooling`` first)."""
    if pooling == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.AvgPool2d(kernel_size=2, stride=2)


class ConvNet(nn.Module):
    """``depth`` conv blocks, each halving the spatial size, then a linear classifier.

    The first conv is never padded beyond ``padding=1``, whatever the channel count: the
    reference code padded 1-channel (MNIST-like) inputs by 2 extra pixels, which broke the
    classifier's input size at 8x8. Here the classifier size is always
    ``width * (image_size >> depth) ** 2``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int,
        width: int,
        depth: int,
        norm: str,
        pooling: str,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, padding=1, bias=True),
                make_norm(norm, width),
                nn.ReLU(inplace=True),
                make_pool(pooling),
            ]
            in_ch = width
        self.features = nn.Sequential(*layers)
        side = image_size >> depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input: flattened conv features (DM matches their class means)."""
        # flatten, not .view: channels-last (non-contiguous) activations must work too.
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
