"""How a dataset is divided (stratified, seeded splits) and identified (content digest).

Why stratified: distillation learns a fixed number of images *per class*, and validation
accuracy drives model selection, so every split must keep the class balance of the source.
Why seeded and deterministic: the same (labels, fraction, seed) must give the same split on
every machine and every Ray worker, otherwise experts and students silently see different
data.
"""

from __future__ import annotations

import hashlib
import math
from numbers import Integral, Real

import numpy as np
import torch

from pdd_ray.errors import PddError


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices per class into ``(kept_indices, split_indices)``.

    Each class with ``n_c`` examples contributes ``round(fraction * n_c)`` examples (half
    rounds up) to the split, at least one when ``fraction > 0``, but never its last
    example: a class must stay present in the kept part, which is what gets trained on.
    Both index tensors are int64 and sorted ascending, so that indexing preserves the
    source order. The choice depends only on ``(labels, fraction, seed)``.
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise PddError(f"stratified_split labels={shape}: expected a 1-D integer torch.Tensor")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise PddError(f"stratified_split labels dtype={labels.dtype}: expected an integer dtype")
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0.0 <= float(fraction) < 1.0:
        raise PddError(f"stratified_split fraction={fraction!r}: expected a number in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise PddError(f"stratified_split seed={seed!r}: expected an integer")

    labels_cpu = labels.detach().to("cpu", torch.int64)
    generator = torch.Generator().manual_seed(int(seed))
    chosen: list[torch.Tensor] = []
    for cls in torch.unique(labels_cpu).tolist():  # sorted, so the RNG stream is stable
        members = torch.nonzero(labels_cpu == cls, as_tuple=False).flatten()
        n = members.numel()
        take = math.floor(float(fraction) * n + 0.5)
        if fraction > 0:
            take = max(take, 1)
        take = min(take, n - 1)  # keep at least one example of every class
        if take > 0:
            perm = torch.randperm(n, generator=generator)
            chosen.append(members[perm[:take]])
    mask = torch.zeros(labels_cpu.numel(), dtype=torch.bool)
    if chosen:
        mask[torch.cat(chosen)] = True
    split = torch.nonzero(mask, as_tuple=False).flatten().to(torch.int64)
    kept = torch.nonzero(~mask, as_tuple=False).flatten().to(torch.int64)
    return kept, split


def dataset_digest(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> str:
    """First 16 hex chars of sha256 over the training pixels and labels.

    Used as lineage and in expert-store keys, so it hashes the raw bytes plus dtype and
    shape (two arrays with the same bytes but different shapes are different datasets).
    Labels are hashed as int64 so the digest does not depend on the label dtype a reader
    happened to produce.
    """
    xa = _as_numpy(x, "x")
    ya = _as_numpy(y, "y").astype(np.int64, copy=False)
    h = hashlib.sha256()
    h.update(f"x:{xa.dtype.str}:{xa.shape};y:{ya.shape};".encode())
    h.update(np.ascontiguousarray(xa).tobytes())
    h.update(np.ascontiguousarray(ya).tobytes())
    return h.hexdigest()[:16]


def _as_numpy(a: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Host numpy view of an array or tensor (any device)."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise PddError(f"dataset_digest {what}={type(a).__name__}: expected a numpy array or torch.Tensor")
