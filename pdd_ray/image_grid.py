"""Image grids of synthetic sets: model-space images back to pixels, one row per class.

The artifact writes one PNG per stage (:func:`save_grid`) and the MLflow stage logger logs
:func:`grid_array` at each evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pdd_ray.atomic import atomic_path
from pdd_ray.data import ZCA


def to_pixels(images: torch.Tensor, mean, std, zca: ZCA | None) -> torch.Tensor:
    """Model-space images back to [0, 1] pixels (inverse ZCA or inverse mean/std)."""
    x = images.detach().cpu().float()
    if zca is not None:
        x = zca.inverse(x)
    else:
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        x = x * s + m
    return x.clamp(0, 1)


def grid_array(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, min_cell: int = 32) -> np.ndarray:
    """An HxWx3 uint8 grid, one row per class; tiny images are upscaled (nearest) to be seen."""
    n, c, h, w = pixels.shape
    per_class = [torch.nonzero(labels == k).flatten() for k in range(num_classes)]
    cols = max(1, max(len(i) for i in per_class))
    scale = max(1, min_cell // h)
    pad = 1
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((num_classes * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=np.uint8)
    arr = (pixels.numpy() * 255).round().astype(np.uint8)
    for k, idx in enumerate(per_class):
        for j, i in enumerate(idx.tolist()):
            img = arr[i].transpose(1, 2, 0)
            if c == 1:
                img = np.repeat(img, 3, axis=2)
            img = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))
            y0, x0 = pad + k * cell_h, pad + j * cell_w
            canvas[y0 : y0 + h * scale, x0 : x0 + w * scale] = img
    return canvas


def save_grid(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path) -> None:
    """Write :func:`grid_array` as a PNG (atomically)."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid_array(pixels, labels, num_classes)).save(tmp, format="PNG")
