"""Device choice in one place, so no module hard-codes a device string."""

from __future__ import annotations

import torch

from pdd_ray.errors import PddError


def pick_device(use_gpu: bool) -> torch.device:
    """The CUDA device Ray assigned to this process when ``use_gpu``, else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PddError("use_gpu is true but no CUDA device is visible to this process; set use_gpu: false")
    return torch.device("cuda", torch.cuda.current_device())
