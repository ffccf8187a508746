"""The tail AlexNet and VGG share: global average pooling to 1x1 and a linear classifier.

Pooling to 1x1 (instead of a size-dependent flatten) is what lets one network take any image
size from 8 up; ``embed`` is the classifier's input, which DM matches.
"""

from __future__ import annotations

import torch
from torch import nn


class PooledClassifier(nn.Module):
    """``features`` → adaptive average pool → ``Linear(channels, classes)``."""

    def _set_head(self, layers: list[nn.Module], channels: int, num_classes: int) -> None:
        """Register the features, the pool and the classifier, in that order (the flat
        parameter layout and the seeded initialisation follow registration order)."""
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (pooled, flattened features)."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
