"""pdd_ray: Progressive Dataset Distillation (PDD) on Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from pdd_ray.distill.artifact import Distilled


def load_distilled(path: str) -> Distilled:
    """Load a distilled artifact directory into ready-to-train tensors (see README, Outputs)."""
    from pdd_ray.distill.artifact import load_distilled as _load

    return _load(path)


__all__ = ["__version__", "load_distilled"]
