"""A JSON-able description of a network, stored with trajectories and artifacts."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch

from pdd_ray.models import build_model


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same network elsewhere (another worker, a later run)."""

    arch: str
    channels: int
    num_classes: int
    image_size: int
    width: int = 128
    depth: int | None = None
    norm: str = "instance"
    pooling: str = "avg"

    def build(self) -> torch.nn.Module:
        """A freshly initialised module (initialisation uses torch's global RNG: seed it first)."""
        return build_model(
            self.arch,
            self.channels,
            self.num_classes,
            self.image_size,
            width=self.width,
            depth=self.depth,
            norm=self.norm,
            pooling=self.pooling,
        )

    def with_arch(self, arch: str) -> ModelSpec:
        """The same data shape with another architecture (cross-architecture evaluation)."""
        return ModelSpec(**{**asdict(self), "arch": arch})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(**d)


#: Initialisation draws from torch's one global CPU generator; networks built side by side in
#: threads (in-loop validation, :func:`pdd_ray.distill.stage.shared_mean`) take turns on it.
_GLOBAL_RNG = threading.Lock()


def build_seeded(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """Build ``spec`` with weights drawn from ``seed`` without disturbing the global RNG.

    Thread-safe: seeding, drawing and restoring the global generator happen under one lock, so
    two threads never interleave their draws (each network's weights depend on its seed only).
    """
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()
