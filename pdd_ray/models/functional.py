"""Run a module as a pure function of one flat parameter vector.

Trajectory matching trains a student network for a few SGD steps on the synthetic images
and differentiates the result w.r.t. those images. That needs the parameters to be ordinary
tensors in the autograd graph (not leaf ``nn.Parameter``s updated in place), and a single
flat vector makes the SGD step and the distance to expert checkpoints one-liners.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from pdd_ray.errors import PddError


class FlatModel:
    """Runs a module with an explicit flat parameter vector.

    The layout is ``named_parameters()`` order, each tensor flattened row-major, so flat
    vectors from any two modules built from the same spec are interchangeable (expert
    checkpoints, Ray workers). Buffers (BatchNorm running statistics) still come from the
    module itself.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = list(model.named_parameters())
        self.names: list[str] = [n for n, _ in named]
        self.shapes: list[torch.Size] = [p.shape for _, p in named]
        self.sizes: list[int] = [p.numel() for _, p in named]
        self.numel: int = sum(self.sizes)

    def _check(self, flat: torch.Tensor) -> None:
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != self.numel:
            shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
            raise PddError(
                f"flat parameter vector of shape {shape} does not fit this model: "
                f"a 1-D tensor of {self.numel} values is accepted"
            )

    def flatten(self) -> torch.Tensor:
        """A detached 1-D float32 copy of the module's current parameters."""
        params = [p.detach().reshape(-1).to(torch.float32) for p in self.model.parameters()]
        if not params:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(params)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of ``flat`` in each parameter's shape; views keep the autograd graph."""
        self._check(flat)
        # One split, not a slice per parameter: a slice's backward writes its gradient into a
        # zero-filled copy of the whole vector, so k parameters cost k full-size fills and adds
        # per backward (and again in the double backward of every unrolled step); split's
        # backward is a single concatenation. Same values, far less memory traffic.
        pieces = flat.split(self.sizes)
        return {name: piece.view(shape) for name, shape, piece in zip(self.names, self.shapes, pieces)}

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output on ``x`` with parameters taken from ``flat`` (differentiable)."""
        return functional_call(self.model, self.unflatten(flat), (x,))

    __call__ = forward

    def load_flat(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the module's parameters in place (e.g. to start from a checkpoint)."""
        views = self.unflatten(flat.detach() if isinstance(flat, torch.Tensor) else flat)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(views[name])
