"""Networks for dataset distillation (ConvNet) and cross-architecture evaluation.

``build_model`` is the single entry point; ``FlatModel`` turns any of them into a function of
a flat parameter vector, as trajectory matching needs.
"""

from __future__ import annotations

from pdd_ray.names import NORMS, POOLINGS
from pdd_ray.models.factory import ARCHS, build_model, check_model_fits, default_depth
from pdd_ray.models.functional import FlatModel

__all__ = [
    "ARCHS",
    "NORMS",
    "POOLINGS",
    "FlatModel",
    "build_model",
    "check_model_fits",
    "default_depth",
]
