"""Differentiable Siamese Augmentation (DSA), as used by MTT/PDD dataset distillation.

Why this exists: distillation matches training trajectories of real and synthetic data, so
the synthetic pixels must receive gradients *through* the augmentation, and real and synthetic
images must be able to receive the *same* random transform ("Siamese"). Plain torchvision
augmentations give neither. This is a clean, vectorised re-implementation of the official DSA
code (Zhao & Bilen 2021, reused by MTT and PDD) that also fixes its stride bug on 1-channel
inputs (crop returned odd strides, and a later ``.view()`` failed).

Reproducibility: every random number is drawn on the CPU from the caller's generator and only
then moved to ``x.device``, so one seed gives the same output on any device. Two ways to pair
transforms (the "Siamese" part):

* ``shared=True``: one parameter draw is used for the whole batch, e.g. real and synthetic
  images concatenated into one batch all get the same transform;
* two calls whose generators are seeded identically, with equal batch sizes, give identical
  per-image transforms (image ``i`` of both calls gets the same parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from pdd_ray.errors import PddError
from pdd_ray.names import DSA_FAMILIES

FAMILIES: tuple[str, ...] = DSA_FAMILIES
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES: tuple[str, ...] = ("single", "all")

# Random numbers always come from the CPU stream so a seed means the same thing on every device.
_RNG_DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class DSAParams:
    """Strengths of each DSA family; defaults are the official DSA/MTT values.

    brightness:     x + (u - 0.5) * brightness, u ~ U(0, 1).
    saturation:     (x - channel mean per pixel) * (u * saturation) + that mean.
    contrast:       (x - mean over C,H,W per image) * (u + contrast) + that mean.
    crop_ratio:     integer translation in [-s, s] per axis, s = int(size * crop_ratio + 0.5);
                    uncovered pixels become 0.
    cutout_ratio:   zero a square of side int(size * cutout_ratio + 0.5) centred at a uniformly
                    random position, clipped at the borders.
    scale_ratio:    independent x/y scale factors ~ U[1/scale_ratio, scale_ratio], zero padding.
    rotate_degrees: angle ~ U[-rotate_degrees, rotate_degrees], zero padding.
    flip_p:         probability of a horizontal flip.
    """

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_ratio: float = 0.125
    cutout_ratio: float = 0.5
    scale_ratio: float = 1.2
    rotate_degrees: float = 15.0
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        # Validate eagerly: a bad strength would otherwise surface as NaNs mid-distillation.
        limits = {
            "brightness": (0.0, math.inf),
            "saturation": (0.0, math.inf),
            "contrast": (0.0, math.inf),
            "crop_ratio": (0.0, 1.0),
            "cutout_ratio": (0.0, 1.0),
            "scale_ratio": (1.0, math.inf),
            "rotate_degrees": (0.0, 180.0),
            "flip_p": (0.0, 1.0),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = limits[f.name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not low <= value <= high:
                raise PddError(
                    f"DSAParams.{f.name}={value!r} is invalid; "
                    f"expected a finite number in [{low}, {high}]"
                )


class _Draws:
    """Source of per-image random parameters for one augmentation call.

    Draws ``count`` values on the CPU (``count`` is 1 in shared mode, else the batch size) and
    places them on the image device, broadcast to the batch, so ops never care about sharing.
    """

    def __init__(
        self, x: torch.Tensor, generator: torch.Generator | None, shared: bool
    ) -> None:
        self.batch = x.shape[0]
        self.count = 1 if shared else self.batch
        self.generator = generator
        self.device = x.device
        self.dtype = x.dtype

    def uniform(self, low: float, high: float) -> torch.Tensor:
        """(N,) floats ~ U[low, high) in the image dtype (drawn as float64 so dtype never
        changes which numbers a seed yields)."""
        u = torch.rand(
            self.count, generator=self.generator, dtype=torch.float64, device=_RNG_DEVICE
        )
        return self._place(low + (high - low) * u).to(self.dtype)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """(N,) int64 ~ uniform integers in [low, high)."""
        r = torch.randint(
            low, high, (self.count,), generator=self.generator, device=_RNG_DEVICE
        )
        return self._place(r)

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device).expand(self.batch)


def _per_image(t: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) so a per-image value broadcasts over C, H, W."""
    return t.view(-1, 1, 1, 1)


def _color(x: torch.Tensor, draws: _Draws, p: DSAParams) -> torch.Tensor:
    """Brightness, then saturation, then contrast (official DSA order)."""
    x = x + _per_image((draws.uniform(0.0, 1.0) - 0.5) * p.brightness)
    pixel_mean = x.mean(dim=1, keepdim=True)
    x = (x - pixel_mean) * _per_image(draws.uniform(0.0, 1.0) * p.saturation) + pixel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_image(draws.uniform(0.0, 1.0) + p.contrast) + image_mean


def _crop(x: torch.Tensor, draws: _Draws, p: DSAParams) -> torch.Tensor:
    """Integer translation with zero fill: out[..., i, j] = x[..., i + dy, j + dx].

    Done with two gathers (rows then columns) so it is exact, differentiable and loop-free.
    """
    n, c, h, w = x.shape
    sy, sx = int(h * p.crop_ratio + 0.5), int(w * p.crop_ratio + 0.5)
    dy, dx = draws.randint(-sy, sy + 1), draws.randint(-sx, sx + 1)
    rows = torch.arange(h, device=x.device).unsqueeze(0) + dy.unsqueeze(1)  # (N, H)
    cols = torch.arange(w, device=x.device).unsqueeze(0) + dx.unsqueeze(1)  # (N, W)
    row_idx = rows.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w)
    col_idx = cols.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w)
    out = x.gather(2, row_idx).gather(3, col_idx)
    inside = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & (
        (cols >= 0) & (cols < w)
    ).view(n, 1, 1, w)
    return torch.where(inside, out, out.new_zeros(()))


def _cutout(x: torch.Tensor, draws: _Draws, p: DSAParams) -> torch.Tensor:
    """Zero one square per image. Centres follow the official code: any pixel for odd sides,
    any pixel corner for even sides, so clipping is symmetric at both borders."""
    n, _, h, w = x.shape
    side_h, side_w = int(h * p.cutout_ratio + 0.5), int(w * p.cutout_ratio + 0.5)
    top = draws.randint(0, h + 1 - side_h % 2) - side_h // 2
    left = draws.randint(0, w + 1 - side_w % 2) - side_w // 2
    rows = torch.arange(h, device=x.device).unsqueeze(0)
    cols = torch.arange(w, device=x.device).unsqueeze(0)
    in_rows = (rows >= top.unsqueeze(1)) & (rows < (top + side_h).unsqueeze(1))
    in_cols = (cols >= left.unsqueeze(1)) & (cols < (left + side_w).unsqueeze(1))
    hole = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
    return torch.where(hole, x.new_zeros(()), x)


def _flip(x: torch.Tensor, draws: _Draws, p: DSAParams) -> torch.Tensor:
    """Horizontal flip of each image with probability flip_p."""
    flip = draws.uniform(0.0, 1.0) < p.flip_p
    return torch.where(_per_image(flip), x.flip(3), x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x through per-image 2x3 affine matrices (normalised coords, zero padding)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: torch.Tensor, draws: _Draws, p: DSAParams) -> torch.Tensor:
    """Independent x/y zoom about the centre."""
    r = p.scale_ratio
    sx, sy = draws.uniform(1.0 / r, r), draws.uniform(1.0 / r, r)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [torch.stack([sx, zero, zero], dim=-1), torch.stack([zero, sy, zero], dim=-1)], dim=1
    )
    return _affine(x, theta)


def _rotate(x: torch.Tensor, draws: _Draws, p: DSAParams) -> torch.Tensor:
    """Rotation about the centre (in normalised coordinates, as the official code does)."""
    angle = draws.uniform(-p.rotate_degrees, p.rotate_degrees) * (math.pi / 180.0)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack(
        [torch.stack([cos, sin, zero], dim=-1), torch.stack([-sin, cos, zero], dim=-1)], dim=1
    )
    return _affine(x, theta)


# Looked up by name at call time (not bound at construction) so tests can spy on them.
_FAMILY_OPS: dict[str, Callable[[torch.Tensor, _Draws, DSAParams], torch.Tensor]] = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}


def _parse_strategy(strategy: str) -> tuple[str, ...]:
    """"a_b_c" -> ("a", "b", "c"); "none"/"" -> (). Rejects unknown and repeated families
    (a repeat would silently double a family's weight in single mode)."""
    if not isinstance(strategy, str):
        raise PddError(
            f"DSA strategy {strategy!r} is not a string; expected families joined by '_' "
            f"from {FAMILIES}, or 'none'"
        )
    if strategy.strip().lower() in ("", "none"):
        return ()
    families = tuple(strategy.split("_"))
    for fam in families:
        if fam not in FAMILIES:
            raise PddError(
                f"unknown DSA family {fam!r} in strategy {strategy!r}; "
                f"expected families from {FAMILIES} joined by '_', or 'none'"
            )
    if len(set(families)) != len(families):
        raise PddError(
            f"DSA strategy {strategy!r} repeats a family; list each of {FAMILIES} at most once"
        )
    return families


class DiffAugment:
    """Differentiable Siamese Augmentation.

    ``strategy`` names families joined by "_" ("none" or "" = identity). ``mode="single"``
    applies ONE family per call, chosen uniformly from the strategy (MTT's aug_mode 'S'; the
    "color" family then applies brightness, saturation and contrast). ``mode="all"`` applies
    every family of the strategy, in strategy order.

    See the module docstring for the reproducibility and Siamese-pairing guarantees.
    """

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        params: DSAParams = DSAParams(),
        mode: str = "single",
    ) -> None:
        if mode not in MODES:
            raise PddError(f"unknown DSA mode {mode!r}; expected one of {MODES}")
        if not isinstance(params, DSAParams):
            raise PddError(f"DSA params {params!r} is not a DSAParams instance")
        self.strategy = strategy
        self.families: tuple[str, ...] = _parse_strategy(strategy)
        self.params = params
        self.mode = mode

    @property
    def enabled(self) -> bool:
        """False when the strategy is identity, so callers can skip the augmentation path."""
        return bool(self.families)

    def __repr__(self) -> str:
        return (
            f"DiffAugment(strategy={self.strategy!r}, mode={self.mode!r}, "
            f"params={self.params!r})"
        )

    def __call__(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        shared: bool = False,
    ) -> torch.Tensor:
        """Augment a float NCHW batch; differentiable w.r.t. x's pixels.

        Each image gets its own random parameters unless ``shared`` is True, in which case one
        draw is used for the whole batch. Randomness comes from ``generator`` (a CPU
        generator; None = torch's global RNG). The result is always standard-contiguous.
        """
        _check_input(x)
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device != _RNG_DEVICE
        ):
            raise PddError(
                f"DSA generator {generator!r} is not usable; expected a CPU torch.Generator "
                "or None (draws happen on the CPU so seeds are device-independent)"
            )
        if not self.families or x.shape[0] == 0:
            return x.contiguous()
        if self.mode == "single":
            pick = int(
                torch.randint(
                    len(self.families), (1,), generator=generator, device=_RNG_DEVICE
                ).item()
            )
            chosen: tuple[str, ...] = (self.families[pick],)
        else:
            chosen = self.families
        draws = _Draws(x, generator, shared)
        for fam in chosen:
            x = _FAMILY_OPS[fam](x, draws, self.params)
        # Ops like grid_sample keep channels-last strides; later .view() calls need standard ones.
        return x.contiguous()


def _check_input(x: object) -> None:
    """Reject anything that is not a float NCHW tensor, with a message saying what was given."""
    if not isinstance(x, torch.Tensor):
        raise PddError(f"DSA input of type {type(x).__name__} is not a tensor; expected float NCHW")
    if x.dim() != 4:
        raise PddError(
            f"DSA input shape {tuple(x.shape)} is not 4-D; expected NCHW (batch, channels, H, W)"
        )
    if not x.is_floating_point():
        raise PddError(f"DSA input dtype {x.dtype} is not floating point; expected a float tensor")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise PddError(f"DSA input shape {tuple(x.shape)} has an empty image; expected H, W >= 1")
