"""The in-memory dataset every other part of pdd_ray consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DatasetBundle:
    """Train/validation/test tensors of one dataset, already normalised.

    Images are float32 NCHW, normalised with ``mean``/``std`` (per channel). Labels are
    int64 in ``[0, num_classes)``. ``val`` is a stratified split carved from the official
    training set and is what all model selection uses; ``test`` is only ever reported.
    ``digest`` is a content hash of the raw training data, used as lineage and as part of
    expert-store keys.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    digest: str
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        return (self.channels, self.image_size, self.image_size)
