"""Readers for class-folder datasets: Tiny ImageNet and user ``imagefolder`` data.

Files are listed with torchvision's ImageFolder scanning (one sub-folder per class, found
recursively, torchvision's image extensions) and decoded one by one with PIL into a single
uint8 array, so that the rest of pdd_ray sees the same in-memory layout as for the array
datasets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pdd_ray.data.sources import RawData, SourceRequest, missing
from pdd_ray.errors import PddError

_GRAY_MODES = ("1", "L", "LA")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- Tiny ImageNet


def read_tiny_imagenet(req: SourceRequest) -> RawData:
    """Tiny ImageNet 200: our *test* set is its labelled val set; our val is carved from train.

    Accepts ``root/{train,val}`` or ``root/tiny-imagenet-200/{train,val}``. Always RGB,
    because a few of its JPEGs are grayscale.
    """
    assert req.root is not None
    base = _tiny_base(req.root)
    if base is None:
        raise missing(req.name, req.root,
                      f"{req.root}/train/<wnid>/images/*.JPEG and {req.root}/val/<wnid>/images/*.JPEG "
                      f"(or the same under {req.root}/tiny-imagenet-200/; it cannot be downloaded automatically)",
                      download=False)
    val_dir = base / "val"
    if _is_raw_val(val_dir):
        raise PddError(
            f"dataset 'tiny_imagenet': {val_dir} is in the raw download layout (images/ + val_annotations.txt); "
            f"its images must be rearranged into class folders val/<wnid>/images/ — run "
            f"pdd_ray.data.reorganize_tiny_imagenet_val('{req.root}') once, then load again"
        )
    classes, train, test = _scan(req.name, base / "train", val_dir)
    size = req.image_size or 64
    train_x = _decode(req.name, [p for p, _ in train], "RGB", size)
    test_x = _decode(req.name, [p for p, _ in test], "RGB", size)
    extra = {"source": str(base)}
    words = _read_words(base / "words.txt", classes)
    if words is not None:
        extra["words"] = words
    return RawData(train_x, _labels(train), test_x, _labels(test), classes, _IMAGENET_MEAN, _IMAGENET_STD,
                   extra=extra)


def _tiny_base(root: Path) -> Path | None:
    for d in (root, root / "tiny-imagenet-200"):
        if (d / "train").is_dir() and (d / "val").is_dir():
            return d
    return None


def _is_raw_val(val_dir: Path) -> bool:
    return (val_dir / "images").is_dir() and (val_dir / "val_annotations.txt").is_file()


def _read_words(path: Path, wnids: list[str]) -> list[str] | None:
    """Human-readable names from words.txt (wnid<TAB>names), if present."""
    if not path.is_file():
        return None
    table = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, words = line.partition("\t")
        table[wnid.strip()] = words.strip()
    return [table.get(w, w) for w in wnids]


def reorganize_tiny_imagenet_val(root: str | os.PathLike) -> int:
    """Move Tiny ImageNet's raw ``val/images/*`` into ``val/<wnid>/images/`` using val_annotations.txt.

    Why: the download ships val as one flat folder plus an annotation file, which class-folder
    readers cannot label. Each file moves with ``os.replace`` (atomic on one filesystem) and
    files already in place are skipped, so an interrupted run can simply be repeated.
    Returns the number of files moved. Accepts ``root`` or ``root/tiny-imagenet-200``.
    """
    root = Path(root).expanduser()
    base = next((d for d in (root, root / "tiny-imagenet-200") if (d / "val").is_dir()), None)
    if base is None:
        raise PddError(
            f"reorganize_tiny_imagenet_val: no val/ folder under {root}; "
            f"expected {root}/val/val_annotations.txt"
        )
    val_dir = base / "val"
    images_dir, annotations = val_dir / "images", val_dir / "val_annotations.txt"
    if not images_dir.is_dir():
        return 0  # already reorganised
    if not annotations.is_file():
        raise PddError(
            f"reorganize_tiny_imagenet_val: {annotations} is missing; "
            "expected the file shipped with Tiny ImageNet"
        )
    moved = 0
    for lineno, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or not _safe_name(fields[0]) or not _safe_name(fields[1]):
            raise PddError(
                f"reorganize_tiny_imagenet_val: {annotations} line {lineno} is {line[:80]!r}; "
                "expected '<file>\\t<wnid>\\t...'"
            )
        filename, wnid = fields[0].strip(), fields[1].strip()
        src, dst = images_dir / filename, val_dir / wnid / "images" / filename
        if dst.is_file():
            continue
        if not src.is_file():
            raise PddError(
                f"reorganize_tiny_imagenet_val: {src}"
                f" (listed in {annotations}) is missing and not yet moved"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        moved += 1
    leftovers = sorted(p.name for p in images_dir.iterdir())
    if leftovers:
        raise PddError(
            f"reorganize_tiny_imagenet_val: {images_dir} still holds {len(leftovers)} file(s) not listed in "
            f"{annotations} (e.g. {leftovers[0]}); move or delete them and run again"
        )
    images_dir.rmdir()
    return moved


def _safe_name(name: str) -> bool:
    """A plain file/folder name: no path separators or dot-dirs (annotations are untrusted)."""
    name = name.strip()
    return bool(name) and name not in (".", "..") and os.path.basename(name) == name and "/" not in name


# --------------------------------------------------------------------------- custom image folders


def read_imagefolder(req: SourceRequest) -> RawData:
    """User data: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root/val/``).

    Grayscale if the first training image is grayscale, else RGB. Without ``image_size``
    every image must already have one square size; with it, all are resized (squashed if
    not square). Mean/std are left to be computed from the training split.
    """
    assert req.root is not None
    train_dir = req.root / "train"
    test_dir = next((req.root / d for d in ("test", "val") if (req.root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise missing(req.name, req.root,
                      f"{req.root}/train/<class>/<image> and {req.root}/test/<class>/<image> "
                      "(or val/ instead of test/)",
                      download=False)
    classes, train, test = _scan(req.name, train_dir, test_dir)
    with _open(req.name, train[0][0]) as first:
        mode = "L" if first.mode in _GRAY_MODES else "RGB"
    size = req.image_size if req.image_size is not None else _common_size(req.name, train + test)
    train_x = _decode(req.name, [p for p, _ in train], mode, size)
    test_x = _decode(req.name, [p for p, _ in test], mode, size)
    return RawData(train_x, _labels(train), test_x, _labels(test), classes,
                   extra={"source": str(req.root), "test_dir": test_dir.name})


def _common_size(name: str, samples: list[tuple[str, int]]) -> int:
    """The one square size all images share (header reads only), else a PddError."""
    sizes: dict[tuple[int, int], str] = {}
    for path, _ in samples:
        with _open(name, path) as im:
            sizes.setdefault(im.size, path)
    if len(sizes) == 1:
        (w, h), = sizes
        if w == h:
            return w
    seen = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:6]) + (" …" if len(sizes) > 6 else "")
    raise PddError(
        f"dataset '{name}': images have sizes {seen}; "
        "expected one square size, or set data.image_size to resize them all"
    )


# --------------------------------------------------------------------------- shared helpers


def _scan(name: str, train_dir: Path, test_dir: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """List (path, label) pairs; test labels use the *train* class indices."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        train = ImageFolder(str(train_dir), allow_empty=False)
        test_classes, _ = find_classes(str(test_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise PddError(f"dataset '{name}': {exc}; expected one sub-folder of images per class") from exc
    unknown = sorted(set(test_classes) - set(train.classes))
    if unknown:
        raise PddError(
            f"dataset '{name}': {test_dir} has class folder(s) {unknown[:5]} absent from {train_dir}; "
            "expected a subset of the train classes"
        )
    test = make_dataset(str(test_dir), train.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not test:
        raise PddError(
            f"dataset '{name}': no images under {test_dir}; "
            f"expected {test_dir}/<class>/<image> files with extensions {IMG_EXTENSIONS}"
        )
    return list(train.classes), list(train.samples), test


def _labels(samples: list[tuple[str, int]]) -> np.ndarray:
    return np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))


def _open(name: str, path: str) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise PddError(f"dataset '{name}': cannot read image {path} ({exc}); expected a readable image file") from exc


def _decode(name: str, paths: list[str], mode: str, size: int) -> np.ndarray:
    """Decode images into one uint8 (N, C, size, size) array, converting and resizing as needed."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, path in enumerate(paths):
        with _open(name, path) as im:
            try:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im)
            except OSError as exc:
                raise PddError(
                    f"dataset '{name}': cannot decode image {path}"
                    f" ({exc}); expected a valid image file"
                ) from exc
        out[i] = arr.reshape(size, size, channels)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
