"""``load_dataset``: one entry point from a dataset name to a normalised :class:`DatasetBundle`.

Readers (``sources``/``folders``) only parse files into uint8 arrays; everything that must
be identical across datasets happens here, once: argument checks, the test carve for
datasets without an official test split, the stratified val carve, the content digest,
uint8 -> float32 scaling (bulk, in torch), optional resizing, and mean/std normalisation.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pdd_ray.data.bundle import DatasetBundle
from pdd_ray.data.folders import read_imagefolder, read_tiny_imagenet
from pdd_ray.data.sources import (RawData, SourceRequest, read_cifar, read_digits, read_fashion_mnist, read_mnist,
                                  read_svhn)
from pdd_ray.data.split import dataset_digest, stratified_split
from pdd_ray.errors import PddError
from pdd_ray.names import DATASETS


#: Seed of the test carve for datasets without an official test split. Fixed, so the test
#: set never moves when the run seed changes (reported numbers stay comparable).
TEST_SPLIT_SEED = 0


@dataclass(frozen=True)
class _Spec:
    reader: Callable[[SourceRequest], RawData]
    needs_root: bool


_SPECS: dict[str, _Spec] = {
    "digits": _Spec(read_digits, needs_root=False),
    "mnist": _Spec(read_mnist, needs_root=True),
    "fashion_mnist": _Spec(read_fashion_mnist, needs_root=True),
    "svhn": _Spec(read_svhn, needs_root=True),
    "cifar10": _Spec(read_cifar, needs_root=True),
    "cifar100": _Spec(read_cifar, needs_root=True),
    "tiny_imagenet": _Spec(read_tiny_imagenet, needs_root=True),
    "imagefolder": _Spec(read_imagefolder, needs_root=True),
}
assert tuple(_SPECS) == DATASETS


def load_dataset(name: str, root: str | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = False, test_fraction: float = 0.2, normalize: bool = True,
                 image_size: int | None = None) -> DatasetBundle:
    """Load a dataset fully into memory as float32 NCHW tensors with int64 labels.

    ``val`` is a stratified ``val_fraction`` of the training data chosen by ``seed``;
    ``test`` is the official test split, or (digits) a stratified ``test_fraction`` carved
    with a fixed seed. ``normalize=False`` leaves pixels in [0, 1] and records mean 0 / std 1
    (for ZCA pipelines). ``image_size`` resizes every image to that square side. Datasets
    without published statistics are normalised with mean/std of their training pool
    (train + val, never test), so the test tensors do not depend on the val seed.
    The digest identifies the training pixels before the val carve (and the resize).
    """
    key = _check_name(name)
    spec = _SPECS[key]
    _check_arguments(val_fraction, test_fraction, seed, download, normalize, image_size)
    root_path = _check_root(key, root) if spec.needs_root else None

    raw = spec.reader(SourceRequest(key, root_path, download, None if image_size is None else int(image_size)))
    raw.check(key)
    extra: dict = {"root": None if root_path is None else str(root_path), "seed": int(seed),
                   "val_fraction": float(val_fraction), "normalized": normalize, **raw.extra}

    train_x, train_y, test_x, test_y = _test_split(raw, test_fraction, extra)

    digest = dataset_digest(train_x, train_y)
    native = train_x.shape[-1]
    resize = image_size is not None and (train_x.shape[-2], native) != (image_size, image_size)
    if resize:  # fold the size in: the same content at another size trains different models
        digest = hashlib.sha256(f"{digest}@{image_size}".encode()).hexdigest()[:16]
        extra["native_image_size"] = native

    keep, val_idx = stratified_split(torch.from_numpy(train_y), float(val_fraction), int(seed))
    parts = {"train": (train_x[keep.numpy()], train_y[keep.numpy()]),
             "val": (train_x[val_idx.numpy()], train_y[val_idx.numpy()]),
             "test": (test_x, test_y)}
    tensors = {}
    for split, (x, y) in parts.items():
        xf = _to_float(x, raw.max_value)
        if resize:
            xf = _resize(xf, int(image_size))
        tensors[split] = (xf, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))

    channels = tensors["train"][0].shape[1]
    mean, std = _normalize_splits(tensors, raw, normalize)

    return DatasetBundle(
        name=key,
        train_x=tensors["train"][0], train_y=tensors["train"][1],
        val_x=tensors["val"][0], val_y=tensors["val"][1],
        test_x=tensors["test"][0], test_y=tensors["test"][1],
        num_classes=len(raw.class_names), class_names=list(raw.class_names),
        channels=int(channels), image_size=int(tensors["train"][0].shape[-1]),
        mean=mean, std=std, digest=digest, extra=extra,
    )


def _check_arguments(val_fraction: float, test_fraction: float, seed: int, download: bool, normalize: bool,
                     image_size: int | None) -> None:
    """One-line errors for :func:`load_dataset`'s arguments, before anything is read."""
    _check_fraction("val_fraction", val_fraction, 0.0, 0.5, low_open=False)
    _check_fraction("test_fraction", test_fraction, 0.0, 0.5, low_open=True)
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise PddError(f"seed={seed!r}: expected an integer")
    if not isinstance(download, bool) or not isinstance(normalize, bool):
        raise PddError(f"download={download!r}, normalize={normalize!r}: expected booleans")
    bad_size = isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size < 1
    if image_size is not None and bad_size:
        raise PddError(f"image_size={image_size!r}: expected a positive integer or None")


def _test_split(raw: RawData, test_fraction: float, extra: dict):
    """(train_x, train_y, test_x, test_y): the official test split, or a stratified
    ``test_fraction`` carved with the fixed ``TEST_SPLIT_SEED``; notes which in ``extra``."""
    train_x, train_y = raw.train_x, raw.train_y
    if raw.test_x is None:
        keep, test_idx = stratified_split(torch.from_numpy(train_y), float(test_fraction), TEST_SPLIT_SEED)
        test_x, test_y = train_x[test_idx.numpy()], train_y[test_idx.numpy()]
        train_x, train_y = train_x[keep.numpy()], train_y[keep.numpy()]
        extra.update(test_source="carved", test_fraction=float(test_fraction))
    else:
        test_x, test_y = raw.test_x, raw.test_y
        extra["test_source"] = "official"
    return train_x, train_y, test_x, test_y


def _normalize_splits(tensors: dict, raw: RawData, normalize: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalise every split in place; returns (mean, std): 0/1 without normalisation, the
    published constants, or the training pool's own statistics (independent of the val seed)."""
    channels = tensors["train"][0].shape[1]
    if not normalize:
        mean, std = (0.0,) * channels, (1.0,) * channels
    elif raw.mean is not None and raw.std is not None:
        mean, std = tuple(raw.mean), tuple(raw.std)
    else:  # from the whole training pool, like the published constants: independent of the val seed
        mean, std = _channel_stats(tensors["train"][0], tensors["val"][0])
    if normalize:
        for xf, _ in tensors.values():
            _normalize_(xf, mean, std)
    return mean, std


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise PddError(f"dataset={name!r}: expected one of {', '.join(DATASETS)}")
    key = name.strip().lower().replace("-", "_")
    if key in _SPECS:
        return key
    close = difflib.get_close_matches(key, DATASETS, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise PddError(f"unknown dataset '{name}'{hint}; expected one of {', '.join(DATASETS)}")


def _check_fraction(what: str, value: object, low: float, high: float, *, low_open: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, Real) and value == value
    if ok:
        v = float(value)
        ok = (low < v if low_open else low <= v) and v <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise PddError(f"{what}={value!r}: expected a number in {interval}")


def _check_root(name: str, root: object) -> Path:
    if root is None or (isinstance(root, str) and not root.strip()):
        raise PddError(f"dataset '{name}': data.root={root!r}; expected the directory that holds its files")
    if not isinstance(root, (str, Path)):
        raise PddError(f"dataset '{name}': data.root={root!r}; expected a directory path string")
    return Path(root).expanduser()


def _to_float(x: np.ndarray, max_value: float) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1], in bulk."""
    return torch.from_numpy(x.astype(np.float32)).div_(float(max_value))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased when shrinking, clamped back into [0, 1]."""
    if x.shape[0] == 0:
        return x.new_zeros((0, x.shape[1], size, size))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def _channel_stats(*parts: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel population mean/std over the given splits.

    Accumulated in float64 over chunks of images, so large datasets never get a full
    float64 copy.
    """
    channels = parts[0].shape[1]
    count = 0
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for x in parts:
        for start in range(0, x.shape[0], 4096):
            chunk = x[start:start + 4096].to(torch.float64)
            total += chunk.sum(dim=(0, 2, 3))
            total_sq += (chunk * chunk).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant channel stays as is
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _normalize_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    x.sub_(m).div_(s)
