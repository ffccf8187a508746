"""Regularised ZCA whitening, as used by trajectory matching (MTT/PDD) on CIFAR-like data.

Matches ``kornia.enhance.ZCAWhitening(eps=eps, compute_inv=True)``: centre the flattened
images, ``cov = Xc^T Xc / (N - 1)``, eigendecompose ``cov = U diag(S) U^T``, then
``W = U diag(1/sqrt(S + eps)) U^T`` and its inverse ``U diag(sqrt(S + eps)) U^T``.
``eps`` keeps near-zero-variance directions (pixel noise) from being blown up.

The fit runs in float64 (a 3072x3072 covariance in float32 loses the small eigenvalues
that whitening divides by) and is stored as float32. A fitted transform is persisted as a
plain ``.npz`` (never pickled) so distilled images can be un-whitened later.
"""

from __future__ import annotations

import hashlib
import math
import io
import os
import zipfile
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from pdd_ray.atomic import atomic_path
from pdd_ray.errors import PddError

_FORMAT = 1
_CHUNK = 4096  # rows per covariance chunk: bounds float64 scratch memory on big datasets


class ZCA:
    """A fitted ZCA transform over flattened (C, H, W) images."""

    def __init__(self, eps: float, mean: torch.Tensor, matrix: torch.Tensor, inverse_matrix: torch.Tensor) -> None:
        d = mean.numel()
        if mean.shape != (d,) or matrix.shape != (d, d) or inverse_matrix.shape != (d, d):
            raise PddError(
                f"ZCA shapes mean={tuple(mean.shape)} matrix={tuple(matrix.shape)} "
                f"inverse={tuple(inverse_matrix.shape)}: expected (D,), (D, D), (D, D)"
            )
        self.eps = float(eps)
        self.mean = mean.detach().to("cpu", torch.float32).contiguous()
        self.matrix = matrix.detach().to("cpu", torch.float32).contiguous()
        self.inverse_matrix = inverse_matrix.detach().to("cpu", torch.float32).contiguous()
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def dim(self) -> int:
        """Number of features D = C * H * W."""
        return self.mean.numel()

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 0.1) -> "ZCA":
        """Fit on training images ``x`` (N, C, H, W); computed in float64 on x's device when it can."""
        if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps <= 0:
            raise PddError(f"ZCA eps={eps!r}: expected a finite number > 0")
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] < 2 or not x.dtype.is_floating_point:
            desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise PddError(f"ZCA.fit x={desc}: expected a floating tensor (N, C, H, W) with N >= 2")
        # float64 is unsupported on some accelerators (e.g. MPS): fall back to the CPU there.
        device = x.device if x.device.type in ("cpu", "cuda") else torch.device("cpu")
        n = x.shape[0]
        flat = x.detach().reshape(n, -1)
        d = flat.shape[1]
        mean = torch.zeros(d, dtype=torch.float64, device=device)
        for start in range(0, n, _CHUNK):
            mean += flat[start:start + _CHUNK].to(device, torch.float64).sum(dim=0)
        mean /= n
        cov = torch.zeros(d, d, dtype=torch.float64, device=device)
        for start in range(0, n, _CHUNK):
            chunk = flat[start:start + _CHUNK].to(device, torch.float64) - mean
            cov.addmm_(chunk.T, chunk)
        cov /= n - 1
        if not torch.isfinite(cov).all():
            raise PddError("ZCA.fit x contains NaN or inf values: expected finite images")
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp_min(0.0)  # round-off can make tiny eigenvalues negative
        scale = torch.sqrt(eigvals + float(eps))
        matrix = (eigvecs / scale) @ eigvecs.T
        inverse = (eigvecs * scale) @ eigvecs.T
        return cls(float(eps), mean, matrix, inverse)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten: ``(x - mean) @ W``, same shape and device as ``x``."""
        mean, matrix, _ = self._on(x)
        flat = self._flat(x, "apply")
        return ((flat - mean) @ matrix).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Un-whiten: ``x @ W^-1 + mean``, same shape and device as ``x``."""
        mean, _, inverse = self._on(x)
        flat = self._flat(x, "inverse")
        return (flat @ inverse + mean).reshape(x.shape)

    def _flat(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            desc = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise PddError(f"ZCA.{op} x={desc}: expected (N, ...) with {self.dim} features per example")
        return x.reshape(x.shape[0], self.dim)

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parameters on x's device and dtype, cached because they can be large (D x D)."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            desc = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise PddError(f"ZCA input {desc}: expected a floating torch.Tensor")
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(x.device, x.dtype) for t in (self.mean, self.matrix, self.inverse_matrix))
        return self._cache[key]

    @property
    def digest(self) -> str:
        """First 16 hex chars of sha256 over eps and the stored float32 arrays (lineage)."""
        h = hashlib.sha256()
        h.update(np.float64(self.eps).tobytes())
        for t in (self.mean, self.matrix, self.inverse_matrix):
            a = t.numpy()
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (:func:`pdd_ray.atomic.atomic_path`), synced to disk."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, format=np.int64(_FORMAT), eps=np.float64(self.eps), mean=self.mean.numpy(),
                     matrix=self.matrix.numpy(), inverse_matrix=self.inverse_matrix.numpy())
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike, data: bytes | None = None) -> "ZCA":
        """Read a file written by :meth:`save`; object arrays are refused (no pickle).

        ``data``: the file's bytes when it was fetched from an object store (``path`` then only
        names it in messages).
        """
        source = io.BytesIO(data) if data is not None else Path(path)
        try:
            with np.load(source, allow_pickle=False) as z:
                fields = {k: z[k] for k in ("format", "eps", "mean", "matrix", "inverse_matrix")}
        except FileNotFoundError as exc:
            raise PddError(f"ZCA file {path} does not exist; expected a .npz written by ZCA.save") from exc
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise PddError(
                f"ZCA file {path} is unreadable or corrupt"
                f" ({exc}); expected a .npz written by ZCA.save"
            ) from exc
        if int(fields["format"]) != _FORMAT:
            raise PddError(f"ZCA file {path} has format {int(fields['format'])}; expected {_FORMAT}")
        arrays = {k: fields[k] for k in ("mean", "matrix", "inverse_matrix")}
        bad = [k for k, a in arrays.items() if a.dtype != np.float32 or not np.isfinite(a).all()]
        if bad or fields["eps"].shape != () or not float(fields["eps"]) > 0:
            raise PddError(f"ZCA file {path} has invalid {bad or ['eps']}; expected finite float32 arrays and eps > 0")
        tensors = (torch.from_numpy(np.array(arrays[k])) for k in ("mean", "matrix", "inverse_matrix"))
        return cls(float(fields["eps"]), *tensors)

    def __repr__(self) -> str:
        return f"ZCA(dim={self.dim}, eps={self.eps:g}, digest={self.digest})"
