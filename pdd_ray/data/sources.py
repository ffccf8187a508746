"""Readers for the built-in array datasets: digits, MNIST, Fashion-MNIST, SVHN, CIFAR-10/100.

Every reader returns a :class:`RawData` of uint8 NCHW arrays straight from the official
on-disk format; splitting, scaling and normalisation happen once, in
:mod:`pdd_ray.data.registry`, so each reader only has to know its file format.

Why our own readers instead of torchvision's dataset classes: nothing on a load path may
unpickle (a dataset directory is untrusted input). torchvision's CIFAR classes unpickle
the python-format batches and its MNIST class falls back to ``torch.load`` of cached
``processed/*.pt`` files, so we parse the binary formats with numpy. torchvision's SVHN
also insists on the official md5, which we leave to its downloader. torchvision is still
used for what is safe: downloading and the class-name lists.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

import numpy as np

from pdd_ray.errors import PddError


@dataclass(frozen=True)
class SourceRequest:
    """What the registry asks a reader for (already validated)."""

    name: str
    root: Path | None
    download: bool
    image_size: int | None


@dataclass
class RawData:
    """One dataset as read from disk: uint8 images (N, C, H, W) and int64 labels.

    ``test_x is None`` means the dataset has no official test split (the registry carves
    one). ``mean``/``std`` of None mean "compute them from the training split".
    ``max_value`` is what a full-intensity pixel reads as (255, or 16 for digits).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_value: float = 255.0
    extra: dict = field(default_factory=dict)

    def check(self, name: str) -> None:
        """Refuse arrays a corrupt file could produce, before anything trains on them."""
        k = len(self.class_names)
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x is None:
                continue
            if x.ndim != 4 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
                raise PddError(
                    f"dataset '{name}': {split} split has images {x.shape} {x.dtype} and labels {y.shape}; "
                    "expected non-empty uint8 (N, C, H, W) images and N labels (corrupt files?)"
                )
            bad = (y < 0) | (y >= k)
            if bad.any():
                raise PddError(
                    f"dataset '{name}': {split} label {int(y[bad][0])} is outside [0, {k}) (corrupt files?)"
                )
        if self.test_x is not None and self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise PddError(
                f"dataset '{name}': test images are {self.test_x.shape[1:]} but train images are "
                f"{self.train_x.shape[1:]}; expected one (C, H, W) shape"
            )


def missing(name: str, root: Path, expected: str, download: bool) -> PddError:
    """The one-line "no data" error: names the dataset, the root and the exact layout."""
    hint = ", or pass data.download=true" if download else ""
    return PddError(f"dataset '{name}': no data under {root} — expected {expected}{hint}")


# --------------------------------------------------------------------------- digits


def read_digits(req: SourceRequest) -> RawData:
    """sklearn's 1797 8x8 digits (ships with scikit-learn; root is ignored).

    Pixels are integers 0..16, so they are stored exactly as uint8 with max_value 16.
    There is no official test split; the registry carves one with a fixed seed.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.asarray(d.images).round().astype(np.uint8)[:, None, :, :]
    y = np.asarray(d.target, dtype=np.int64)
    return RawData(x, y, None, None, [str(i) for i in range(10)], max_value=16.0, extra={"source": "sklearn"})


# --------------------------------------------------------------------------- MNIST family


_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_mnist(req: SourceRequest) -> RawData:
    """MNIST from torchvision's raw layout: ``root/MNIST/raw/*-idx?-ubyte[.gz]``."""
    from torchvision.datasets import MNIST

    return _read_idx_dataset(req, MNIST, (0.1307,), (0.3081,))


def read_fashion_mnist(req: SourceRequest) -> RawData:
    """Fashion-MNIST from torchvision's raw layout: ``root/FashionMNIST/raw/*-idx?-ubyte[.gz]``."""
    from torchvision.datasets import FashionMNIST

    return _read_idx_dataset(req, FashionMNIST, (0.2861,), (0.3530,))


def _read_idx_dataset(req: SourceRequest, tv_cls: type, mean: tuple, std: tuple) -> RawData:
    assert req.root is not None
    raw_dir = req.root / tv_cls.__name__ / "raw"
    if req.download:
        _download_idx(req.name, tv_cls, raw_dir)
    files = {stem: _find_idx(raw_dir, stem) for pair in _IDX.values() for stem in pair}
    if any(p is None for p in files.values()):
        expected = (f"{raw_dir}/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    "t10k-labels-idx1-ubyte (or the .gz files)")
        raise missing(req.name, req.root, expected, download=True)
    arrays = {}
    for split, (img_stem, lbl_stem) in _IDX.items():
        images = read_idx(files[img_stem], req.name)
        labels = read_idx(files[lbl_stem], req.name)
        if images.ndim != 3 or labels.ndim != 1:
            raise PddError(
                f"dataset '{req.name}': {files[img_stem]} has shape {images.shape} and {files[lbl_stem]} "
                f"has {labels.shape}; expected (N, H, W) images and (N,) labels"
            )
        arrays[split] = (images[:, None, :, :].copy(), labels.astype(np.int64))
    return RawData(*arrays["train"], *arrays["test"], list(tv_cls.classes), mean, std,
                   extra={"source": str(raw_dir)})


def _find_idx(raw_dir: Path, stem: str) -> Path | None:
    """The uncompressed file torchvision extracts, or the .gz as downloaded by hand."""
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, name: str = "mnist") -> np.ndarray:
    """Parse an unsigned-byte idx file (LeCun's MNIST format), optionally gzipped.

    Layout: 2 zero bytes, type byte 0x08 (ubyte), ndim byte, ndim big-endian uint32
    dimensions, then the row-major payload.
    """
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise PddError(f"dataset '{name}': cannot read {path} ({exc}); expected an idx-ubyte file") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PddError(
            f"dataset '{name}': {path} starts with {data[:4].hex() or 'nothing'}; "
            "expected the idx-ubyte magic 000008xx"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4")) if len(data) >= header else ()
    payload = len(data) - header
    if len(dims) != ndim or payload != math.prod(dims):
        raise PddError(
            f"dataset '{name}': {path} is truncated or corrupt"
            f" (header says {dims}, {payload} payload bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _download_idx(name: str, tv_cls: type, raw_dir: Path) -> None:
    """Fetch missing idx files with torchvision's mirrors and checksums."""
    from torchvision.datasets.utils import download_and_extract_archive

    for filename, md5 in tv_cls.resources:
        if _find_idx(raw_dir, filename.removesuffix(".gz")) is not None:
            continue
        os.makedirs(raw_dir, exist_ok=True)
        errors = []
        for mirror in tv_cls.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=str(raw_dir),
                                             filename=filename, md5=md5)
                break
            except (RuntimeError, URLError, OSError) as exc:
                errors.append(f"{mirror}: {exc}")
        else:
            raise PddError(
                f"dataset '{name}': download of {filename} failed ({' | '.join(errors)}); "
                f"place it in {raw_dir} by hand"
            )


# --------------------------------------------------------------------------- SVHN


_SVHN_FILES = {"train": ("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                         "e26dedcc434d2e4c54c9b2d4a06d8373"),
               "test": ("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                        "eb5a983be6a315427106f1b164d9cef3")}


def read_svhn(req: SourceRequest) -> RawData:
    """SVHN cropped digits: ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (torchvision's layout).

    The .mat files hold X (32, 32, 3, N) uint8 and y (N, 1) with label 10 meaning digit 0.
    """
    assert req.root is not None
    if req.download:
        from torchvision.datasets.utils import download_url

        for filename, url, md5 in _SVHN_FILES.values():
            if not (req.root / filename).is_file():
                try:
                    download_url(url, str(req.root), filename, md5)
                except (RuntimeError, URLError, OSError) as exc:
                    raise PddError(
                        f"dataset 'svhn': download of {url} failed"
                        f" ({exc}); place {filename} in {req.root} by hand"
                    ) from exc
    paths = {split: req.root / spec[0] for split, spec in _SVHN_FILES.items()}
    if not all(p.is_file() for p in paths.values()):
        raise missing(req.name, req.root, f"{paths['train']} and {paths['test']}", download=True)
    train = _read_svhn_mat(paths["train"])
    test = _read_svhn_mat(paths["test"])
    return RawData(*train, *test, [str(i) for i in range(10)], (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                   extra={"source": str(req.root)})


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
        x, y = mat["X"], mat["y"]
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise PddError(f"dataset 'svhn': cannot read {path} ({exc}); expected a MATLAB v5 file with X and y") from exc
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise PddError(f"dataset 'svhn': {path} X is {x.shape} {x.dtype}; expected (32, 32, 3, N) uint8")
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise PddError(f"dataset 'svhn': {path} has labels in [{labels.min()}, {labels.max()}]; expected 1..10")
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
    return images, labels % 10  # label 10 is the digit 0


# --------------------------------------------------------------------------- CIFAR


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class _CifarSpec:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    names_file: str
    python_folder: str
    label_bytes: int  # label bytes before the 3072 pixel bytes; the last one is the label used
    num_classes: int
    url: str
    md5: str


_CIFAR = {
    "cifar10": _CifarSpec("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
                          "batches.meta.txt", "cifar-10-batches-py", 1, 10,
                          "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                          "c32a1d4ab5d03f1284b67883e8d87530"),
    "cifar100": _CifarSpec("cifar-100-binary", ("train.bin",), "test.bin", "fine_label_names.txt", "cifar-100-python",
                           2, 100, "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                           "03b5dce01913d631647c71ecec9e9cb8"),
}


def read_cifar(req: SourceRequest) -> RawData:
    """CIFAR-10/100 from the official *binary* version, parsed with numpy (never unpickled).

    Records are ``label_bytes`` label bytes then 3072 pixel bytes (R, G, B planes of 32x32);
    CIFAR-100 records carry (coarse, fine) and we use the fine label.
    """
    assert req.root is not None
    spec = _CIFAR[req.name]
    data_dir = _cifar_dir(req.root, spec)
    if data_dir is None and req.download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(spec.url, download_root=str(req.root), md5=spec.md5)
        except (RuntimeError, URLError, OSError) as exc:
            raise PddError(
                f"dataset '{req.name}': download of {spec.url} failed"
                f" ({exc}); extract it into {req.root} by hand"
            ) from exc
        data_dir = _cifar_dir(req.root, spec)
    if data_dir is None:
        expected_dir = req.root / spec.folder
        if (req.root / spec.python_folder).is_dir():
            raise PddError(
                f"dataset '{req.name}': {req.root / spec.python_folder} is the python (pickle) version, which "
                f"pdd_ray refuses to unpickle — get the binary version {spec.url} and extract it so that "
                f"{expected_dir}/{spec.test_file} exists, or pass data.download=true"
            )
        files = f"{expected_dir}/{spec.train_files[0]}"
        if len(spec.train_files) > 1:
            files += f" … {spec.train_files[-1]}"
        raise missing(req.name, req.root, f"{files} and {spec.test_file} (the binary version)", download=True)
    train = [_read_cifar_records(data_dir / f, spec, req.name) for f in spec.train_files]
    test = _read_cifar_records(data_dir / spec.test_file, spec, req.name)
    names = _read_names(data_dir / spec.names_file, spec.num_classes)
    return RawData(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), *test, names,
                   _CIFAR_MEAN, _CIFAR_STD, extra={"source": str(data_dir)})


def _cifar_dir(root: Path, spec: _CifarSpec) -> Path | None:
    """The folder holding the binary batches: ``root/<folder>`` or root itself."""
    for d in (root / spec.folder, root):
        if all((d / f).is_file() for f in (*spec.train_files, spec.test_file)):
            return d
    return None


def _read_cifar_records(path: Path, spec: _CifarSpec, name: str) -> tuple[np.ndarray, np.ndarray]:
    record = spec.label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise PddError(
            f"dataset '{name}': {path} has {raw.size} bytes; "
            f"expected a non-empty multiple of {record}-byte records"
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, spec.label_bytes - 1].astype(np.int64)
    images = rows[:, spec.label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _read_names(path: Path, num_classes: int) -> list[str]:
    """Class names, one per line; numbered names if the file is absent or malformed."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        names = [line.strip() for line in lines if line.strip()]
        if len(names) == num_classes:
            return names
    return [str(i) for i in range(num_classes)]
