"""ResNet-18, CIFAR style, for cross-architecture evaluation of distilled data.

CIFAR style means a 3x3 stride-1 stem and no stem max-pool, so small images (down to 8x8)
keep enough resolution; an adaptive average pool before the classifier makes any input size
from 8 upward work. Widths are the standard 64-128-256-512: the ConvNet ``width`` setting
does not carry over (a distilled set is judged on the *standard* ResNet-18), so ``width`` is
ignored here, as are ``depth`` and ``pooling``.
"""

from __future__ import annotations

import torch
from torch import nn

from pdd_ray.models.convnet import make_norm

STAGE_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)
BLOCKS_PER_STAGE: tuple[int, ...] = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), make_norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 ending in global average pooling and ``Linear(512, classes)``."""

    def __init__(self, channels: int, num_classes: int, norm: str) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False),
            make_norm(norm, STAGE_WIDTHS[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        in_ch = STAGE_WIDTHS[0]
        for i, (out_ch, n) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride, norm))
                in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (pooled, flattened features)."""
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
