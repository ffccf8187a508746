"""Writers of tiny fake datasets in the real on-disk formats (no downloads in tests).

Every fake image encodes its label: its mean intensity is exactly ``class_level(label)``
(the within-image pattern is zero-mean), so :func:`decode_labels` recovers the label from
loaded pixels and a test can check that images and labels line up. The pattern also makes
orientation checkable: the top half is brighter than the bottom half, and for RGB images
channel 0 is brighter than channel 2 (see :func:`fake_image`).

Labels cycle ``i % classes``, so every class is present in every split.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROW_DELTA = 10  # top half +ROW_DELTA, bottom half -ROW_DELTA
CHANNEL_DELTA = 12  # RGB: channel 0 +CHANNEL_DELTA, channel 2 -CHANNEL_DELTA


def class_level(label: int, classes: int) -> int:
    """Mean grey level (0..255) of every image of ``label``; distinct for up to 176 classes."""
    return 40 + round(label * 175 / max(classes - 1, 1))


def fake_image(label: int, classes: int, size: int, channels: int) -> np.ndarray:
    """A (C, size, size) uint8 image whose exact mean is ``class_level(label, classes)``."""
    level = class_level(label, classes)
    img = np.full((channels, size, size), level, dtype=np.int64)
    img[:, : size // 2] += ROW_DELTA
    img[:, size // 2:] -= ROW_DELTA
    if channels == 3:
        img[0] += CHANNEL_DELTA
        img[2] -= CHANNEL_DELTA
    return img.astype(np.uint8)


def fake_images(n: int, classes: int, size: int, channels: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, C, H, W) uint8 with labels ``(offset + i) % classes`` (int64)."""
    labels = (np.arange(n) + offset) % classes
    images = np.stack([fake_image(int(c), classes, size, channels) for c in labels])
    return images, labels.astype(np.int64)


def decode_labels(x: torch.Tensor, classes: int) -> torch.Tensor:
    """Labels recovered from images in [0, 1] (load with ``normalize=False``): nearest class level."""
    levels = torch.tensor([class_level(c, classes) for c in range(classes)], dtype=torch.float64)
    means = x.reshape(x.shape[0], -1).to(torch.float64).mean(dim=1) * 255.0
    return (means[:, None] - levels[None, :]).abs().argmin(dim=1)


# --------------------------------------------------------------------------- MNIST family


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx_dataset(root: Path, folder: str, n_train: int, n_test: int, classes: int, gz: bool) -> Path:
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 3)):
        images, labels = fake_images(n, classes, 28, 1, offset)
        for kind, array in (("images-idx3-ubyte", images[:, 0]), ("labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            name = f"{prefix}-{kind}"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return Path(root)


def write_fake_mnist(root: str | Path, n_train: int = 40, n_test: int = 20, classes: int = 10, *,
                     gz: bool = False) -> Path:
    """``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision's raw layout)."""
    return _write_idx_dataset(Path(root), "MNIST", n_train, n_test, classes, gz)


def write_fake_fashion_mnist(root: str | Path, n_train: int = 40, n_test: int = 20, classes: int = 10, *,
                             gz: bool = False) -> Path:
    """``root/FashionMNIST/raw/...`` in the same idx-ubyte format as MNIST."""
    return _write_idx_dataset(Path(root), "FashionMNIST", n_train, n_test, classes, gz)


# --------------------------------------------------------------------------- SVHN


def write_fake_svhn(root: str | Path, n_train: int = 40, n_test: int = 20, classes: int = 10) -> Path:
    """``root/{train,test}_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 3)):
        images, labels = fake_images(n, classes, 32, 3, offset)
        x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # (N, C, H, W) -> (H, W, C, N)
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
    return root


# --------------------------------------------------------------------------- CIFAR (binary version)


def _cifar_records(images: np.ndarray, label_columns: list[np.ndarray]) -> bytes:
    cols = [c.astype(np.uint8).reshape(-1, 1) for c in label_columns]
    return np.concatenate([*cols, images.reshape(len(images), -1)], axis=1).tobytes()


def write_fake_cifar10(root: str | Path, n_per_batch: int = 10, n_test: int = 20, classes: int = 10) -> Path:
    """``root/cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin``, ``batches.meta.txt``."""
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(1, 6):
        images, labels = fake_images(n_per_batch, classes, 32, 3, offset=b)
        (folder / f"data_batch_{b}.bin").write_bytes(_cifar_records(images, [labels]))
    images, labels = fake_images(n_test, classes, 32, 3)
    (folder / "test_batch.bin").write_bytes(_cifar_records(images, [labels]))
    (folder / "batches.meta.txt").write_text("".join(f"class{c}\n" for c in range(classes)) + "\n")
    return Path(root)


def write_fake_cifar100(root: str | Path, n_train: int = 200, n_test: int = 100, classes: int = 100) -> Path:
    """``root/cifar-100-binary/{train,test}.bin`` (coarse byte, fine byte, pixels) and label-name files."""
    folder = Path(root) / "cifar-100-binary"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train.bin", n_train, 0), ("test.bin", n_test, 7)):
        images, fine = fake_images(n, classes, 32, 3, offset)
        (folder / name).write_bytes(_cifar_records(images, [fine // 5, fine]))
    (folder / "fine_label_names.txt").write_text("".join(f"fine{c}\n" for c in range(classes)))
    (folder / "coarse_label_names.txt").write_text("".join(f"coarse{c}\n" for c in range(max(classes // 5, 1))))
    return Path(root)


def write_fake_cifar10_python(root: str | Path) -> Path:
    """Only the python (pickle) layout ``root/cifar-10-batches-py/`` — placeholder files, never read."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not read")
    return Path(root)


# --------------------------------------------------------------------------- class folders


def _save(image: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    hwc = image.transpose(1, 2, 0)
    Image.fromarray(hwc[:, :, 0] if mode == "L" else hwc, mode=mode).save(path)


def write_fake_tiny_imagenet(root: str | Path, classes: int = 3, per_class: int = 4, raw_val: bool = False, *,
                             val_per_class: int = 2) -> Path:
    """``root/tiny-imagenet-200/`` with wnids.txt, words.txt, ``train/<wnid>/images/*.JPEG``, and val.

    ``raw_val=True`` writes val as downloaded (``val/images/`` + ``val/val_annotations.txt``),
    otherwise as class folders ``val/<wnid>/images/``. The first image of each split is
    grayscale, like the few grayscale JPEGs of the real set. Returns the tiny-imagenet-200 dir.
    """
    base = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{c:08d}" for c in range(classes)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {c}, object {c}\n" for c, w in enumerate(wnids)))
    for c, wnid in enumerate(wnids):
        boxes = []
        for i in range(per_class):
            name = f"{wnid}_{i}.JPEG"
            mode = "L" if (c, i) == (0, 0) else "RGB"
            _save(fake_image(c, classes, 64, 1 if mode == "L" else 3), base / "train" / wnid / "images" / name, mode)
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    for k in range(classes * val_per_class):
        c = k % classes
        name = f"val_{k}.JPEG"
        folder = base / "val" / "images" if raw_val else base / "val" / wnids[c] / "images"
        mode = "L" if k == 0 else "RGB"
        _save(fake_image(c, classes, 64, 1 if mode == "L" else 3), folder / name, mode)
        annotations.append(f"{name}\t{wnids[c]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    return base


def write_fake_imagefolder(root: str | Path, classes: int = 3, per_class: int = 5, size: int = 16, mode: str = "RGB",
                           *, test_per_class: int = 2, test_dir: str = "test", mixed_sizes: bool = False) -> Path:
    """``root/train/class<c>/<i>.png`` and ``root/<test_dir>/class<c>/<i>.png`` (lossless PNG).

    ``mixed_sizes=True`` makes every odd image ``2 * size`` pixels wide and high.
    """
    root = Path(root)
    channels = 1 if mode == "L" else 3
    for split, n in (("train", per_class), (test_dir, test_per_class)):
        for c in range(classes):
            for i in range(n):
                side = 2 * size if mixed_sizes and i % 2 else size
                _save(fake_image(c, classes, side, channels), root / split / f"class{c}" / f"{i}.png", mode)
    return root
