"""Tests for pdd_ray.data: dataset loading, splits, digests and the one-line errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from fakes import (CHANNEL_DELTA, ROW_DELTA, decode_labels, write_fake_cifar10, write_fake_cifar10_python,
                   write_fake_cifar100, write_fake_fashion_mnist, write_fake_imagefolder, write_fake_mnist,
                   write_fake_svhn, write_fake_tiny_imagenet)

from pdd_ray.data import (DATASETS, DatasetBundle, dataset_digest, load_dataset, reorganize_tiny_imagenet_val,
                          stratified_split)
from pdd_ray.errors import PddError


def all_splits(b: DatasetBundle) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b.train_x, b.val_x, b.test_x]), torch.cat([b.train_y, b.val_y, b.test_y])


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    """Images as rows, in lexicographic order: a multiset we can compare."""
    rows = x.reshape(len(x), -1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


# --------------------------------------------------------------------------- stratified_split


def test_stratified_split_counts_disjoint_and_deterministic():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3] * 1)
    kept, split = stratified_split(labels, 0.3, seed=5)
    assert kept.dtype == split.dtype == torch.int64
    assert sorted(torch.cat([kept, split]).tolist()) == list(range(len(labels)))  # a partition
    # round(0.3 * n): 3, 2 (2.1), 1 (0.9), and a singleton class keeps its only example
    assert Counter(labels[split].tolist()) == {0: 3, 1: 2, 2: 1}
    again_kept, again_split = stratified_split(labels, 0.3, seed=5)
    assert torch.equal(split, again_split) and torch.equal(kept, again_kept)
    assert any(not torch.equal(split, stratified_split(labels, 0.3, seed=s)[1]) for s in range(6, 12))


def test_stratified_split_at_least_one_and_zero_fraction():
    labels = torch.arange(5).repeat(4)  # 5 classes x 4
    _, split = stratified_split(labels, 0.05, seed=0)  # round(0.2) = 0 -> at least 1
    assert Counter(labels[split].tolist()) == {c: 1 for c in range(5)}
    kept, split = stratified_split(labels, 0.0, seed=0)
    assert split.numel() == 0 and torch.equal(kept, torch.arange(20))


@pytest.mark.parametrize("bad", [dict(labels=torch.zeros(3, 2, dtype=torch.long)), dict(labels=torch.zeros(4)),
                                 dict(fraction=1.0), dict(fraction=-0.1), dict(seed=1.5)])
def test_stratified_split_bad_inputs(bad):
    args = dict(labels=torch.zeros(4, dtype=torch.long), fraction=0.5, seed=0) | bad
    with pytest.raises(PddError):
        stratified_split(**args)


def test_dataset_digest_tracks_content_shape_and_labels():
    x = np.arange(24, dtype=np.uint8).reshape(2, 1, 3, 4)
    y = np.array([0, 1])
    d = dataset_digest(x, y)
    assert len(d) == 16 and int(d, 16) >= 0
    assert dataset_digest(torch.from_numpy(x), torch.tensor([0, 1], dtype=torch.int32)) == d
    assert dataset_digest(x.reshape(2, 1, 4, 3), y) != d
    assert dataset_digest(x, np.array([1, 0])) != d
    x2 = x.copy()
    x2[0, 0, 0, 0] += 1
    assert dataset_digest(x2, y) != d


# --------------------------------------------------------------------------- digits (real data)


@pytest.fixture(scope="module")
def digits_raw():
    from sklearn.datasets import load_digits

    return load_digits()


def test_digits_shapes_partition_and_stratification(digits_raw):
    b = load_dataset("digits", val_fraction=0.1, seed=0, normalize=False)
    assert b.name == "digits" and b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert b.shape == (1, 8, 8) and b.channels == 1 and b.image_size == 8
    assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64
    assert len(b.train_x) + len(b.val_x) + len(b.test_x) == 1797
    # The three splits together are exactly sklearn's images (as a multiset) with their labels.
    x, y = all_splits(b)
    assert np.array_equal(sorted_rows((x * 16).round()), sorted_rows(torch.from_numpy(digits_raw.images).float()))
    assert Counter(y.tolist()) == Counter(digits_raw.target.tolist())
    # Stratified: each class has its share in every split.
    full = Counter(digits_raw.target.tolist())
    for split_y, frac in ((b.test_y, 0.2), (b.val_y, 0.1 * 0.8)):
        counts = Counter(split_y.tolist())
        for c, n in full.items():
            assert abs(counts[c] - frac * n) <= 1.5, (c, counts[c], frac * n)
    assert b.mean == (0.0,) and b.std == (1.0,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_digits_test_split_fixed_val_split_follows_seed():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=1)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.val_y, b.val_y) or not torch.equal(a.val_x, b.val_x)
    assert a.digest == b.digest  # same training content, only the val carve moved
    assert load_dataset("digits", seed=0).digest == a.digest
    assert load_dataset("digits", test_fraction=0.3).digest != a.digest  # different training content
    assert a.extra["test_source"] == "carved"


def test_digits_normalised_train_is_standardised():
    b = load_dataset("digits")
    pool = torch.cat([b.train_x, b.val_x])  # stats come from the training pool, never test
    assert abs(float(pool.mean())) < 1e-4 and abs(float(pool.std(unbiased=False)) - 1.0) < 1e-4
    assert abs(float(b.train_x.mean())) < 0.02 and abs(float(b.train_x.std(unbiased=False)) - 1.0) < 0.02
    raw = load_dataset("digits", normalize=False)
    assert b.mean[0] == pytest.approx(float(torch.cat([raw.train_x, raw.val_x]).mean()), rel=1e-5)
    assert torch.allclose(b.test_x * b.std[0] + b.mean[0], raw.test_x, atol=1e-5)


def test_digits_zero_val_fraction_and_resize():
    b = load_dataset("digits", val_fraction=0.0)
    assert b.val_x.shape == (0, 1, 8, 8) and b.val_y.shape == (0,)
    big = load_dataset("digits", image_size=16, normalize=False)
    assert big.shape == (1, 16, 16) and big.train_x.shape[1:] == (1, 16, 16)
    assert big.extra["native_image_size"] == 8 and big.digest != b.digest
    assert 0.0 <= float(big.train_x.min()) and float(big.train_x.max()) <= 1.0


# --------------------------------------------------------------------------- fake datasets in the real formats


def check_aligned(b: DatasetBundle) -> None:
    for x, y in ((b.train_x, b.train_y), (b.val_x, b.val_y), (b.test_x, b.test_y)):
        assert torch.equal(decode_labels(x, b.num_classes), y)


def check_orientation(b: DatasetBundle) -> None:
    """Top half brighter than bottom half; for RGB channel 0 brighter than channel 2."""
    x = b.train_x
    h = x.shape[2] // 2
    assert float(x[:, :, :h].mean() - x[:, :, h:].mean()) * 255 == pytest.approx(2 * ROW_DELTA, abs=1.5)
    if b.channels == 3:
        assert float(x[:, 0].mean() - x[:, 2].mean()) * 255 == pytest.approx(2 * CHANNEL_DELTA, abs=1.5)


@pytest.mark.parametrize("name,writer,shape,train,test", [
    ("mnist", write_fake_mnist, (1, 28, 28), 40, 20),
    ("fashion_mnist", write_fake_fashion_mnist, (1, 28, 28), 40, 20),
    ("svhn", write_fake_svhn, (3, 32, 32), 40, 20),
    ("cifar10", write_fake_cifar10, (3, 32, 32), 50, 20),
    ("cifar100", write_fake_cifar100, (3, 32, 32), 200, 100),
])
def test_fake_array_datasets_load_aligned(tmp_path, name, writer, shape, train, test):
    writer(tmp_path)
    b = load_dataset(name, str(tmp_path), normalize=False)
    assert b.shape == shape and b.train_x.shape[1:] == shape and b.test_x.shape[1:] == shape
    assert b.num_classes == (100 if name == "cifar100" else 10) == len(b.class_names)
    assert len(b.train_x) + len(b.val_x) == train and len(b.test_x) == test
    assert set(b.val_y.tolist()) == set(b.train_y.tolist()) == set(range(b.num_classes))  # stratified
    assert b.extra["test_source"] == "official"
    check_aligned(b)
    check_orientation(b)
    normed = load_dataset(name, str(tmp_path))
    assert len(normed.mean) == shape[0] and normed.mean != (0.0,) * shape[0]
    m, s = torch.tensor(normed.mean).view(1, -1, 1, 1), torch.tensor(normed.std).view(1, -1, 1, 1)
    assert torch.allclose(normed.train_x * s + m, b.train_x, atol=1e-5)
    assert normed.digest == b.digest


def test_fake_class_names_and_gz_idx(tmp_path):
    write_fake_cifar10(tmp_path / "c10")
    assert load_dataset("cifar10", str(tmp_path / "c10")).class_names == [f"class{c}" for c in range(10)]
    write_fake_cifar100(tmp_path / "c100")
    assert load_dataset("cifar100", str(tmp_path / "c100")).class_names[:2] == ["fine0", "fine1"]
    write_fake_mnist(tmp_path / "m", gz=True)
    b = load_dataset("mnist", str(tmp_path / "m"), normalize=False)
    assert b.mean == (0.0,) and len(b.test_x) == 20
    check_aligned(b)
    assert load_dataset("MNIST", str(tmp_path / "m")).mean == (0.1307,)  # canonical name is case-insensitive


def test_fake_tiny_imagenet(tmp_path):
    base = write_fake_tiny_imagenet(tmp_path, classes=3, per_class=4, val_per_class=2)
    b = load_dataset("tiny_imagenet", str(tmp_path), normalize=False, val_fraction=0.25)
    assert b.shape == (3, 64, 64) and b.num_classes == 3 and b.class_names == [f"n{c:08d}" for c in range(3)]
    assert (len(b.train_x), len(b.val_x), len(b.test_x)) == (9, 3, 6)
    assert b.extra["words"][1] == "thing 1, object 1"
    check_aligned(b)  # JPEG and one grayscale image per split still decode to their labels
    assert load_dataset("tiny_imagenet", str(base)).mean == (0.485, 0.456, 0.406)  # the inner dir works too


def test_tiny_imagenet_raw_val_needs_reorganising(tmp_path):
    base = write_fake_tiny_imagenet(tmp_path, raw_val=True)
    with pytest.raises(PddError, match="reorganize_tiny_imagenet_val") as info:
        load_dataset("tiny_imagenet", str(tmp_path))
    assert "\n" not in str(info.value)
    assert reorganize_tiny_imagenet_val(tmp_path) == 6
    assert not (base / "val" / "images").exists() and (base / "val" / "n00000001" / "images" / "val_1.JPEG").is_file()
    assert reorganize_tiny_imagenet_val(tmp_path) == 0  # idempotent
    b = load_dataset("tiny_imagenet", str(tmp_path), normalize=False)
    assert len(b.test_x) == 6
    check_aligned(b)


def test_reorganize_resumes_after_interruption(tmp_path):
    base = write_fake_tiny_imagenet(tmp_path, raw_val=True)
    # Simulate a crash after the first file was moved.
    (base / "val" / "n00000000" / "images").mkdir(parents=True)
    (base / "val" / "images" / "val_0.JPEG").rename(base / "val" / "n00000000" / "images" / "val_0.JPEG")
    assert reorganize_tiny_imagenet_val(base) == 5


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_fake_imagefolder(tmp_path, mode, channels):
    write_fake_imagefolder(tmp_path, classes=3, per_class=5, size=16, mode=mode)
    b = load_dataset("imagefolder", str(tmp_path), normalize=False)
    assert b.shape == (channels, 16, 16) and b.class_names == ["class0", "class1", "class2"]
    assert len(b.train_x) + len(b.val_x) == 15 and len(b.test_x) == 6
    check_aligned(b)
    check_orientation(b)
    normed = load_dataset("imagefolder", str(tmp_path))
    pool = torch.cat([normed.train_x, normed.val_x])  # mean/std computed from the training pool
    assert pool.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (pool.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4


def test_imagefolder_mixed_sizes_error_and_resize(tmp_path):
    write_fake_imagefolder(tmp_path, size=16, mixed_sizes=True, test_dir="val")
    with pytest.raises(PddError, match=r"16x16, 32x32.*data\.image_size"):
        load_dataset("imagefolder", str(tmp_path))
    b = load_dataset("imagefolder", str(tmp_path), image_size=24, normalize=False)
    assert b.shape == (3, 24, 24) and b.test_x.shape[1:] == (3, 24, 24) and b.extra["test_dir"] == "val"
    check_aligned(b)


# --------------------------------------------------------------------------- errors


EXPECTED_LAYOUT = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte",
    "fashion_mnist": "FashionMNIST/raw/train-images-idx3-ubyte",
    "svhn": "train_32x32.mat",
    "cifar10": "cifar-10-batches-bin/data_batch_1.bin",
    "cifar100": "cifar-100-binary/train.bin",
    "tiny_imagenet": "train/<wnid>/images",
    "imagefolder": "train/<class>",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYOUT))
@pytest.mark.parametrize("exists", [True, False])
def test_missing_root_is_one_line_naming_root_and_layout(tmp_path, name, exists):
    root = tmp_path / ("empty" if exists else "absent")
    if exists:
        root.mkdir()
    with pytest.raises(PddError) as info:
        load_dataset(name, str(root))
    msg = str(info.value)
    assert "\n" not in msg and f"'{name}'" in msg and str(root) in msg and EXPECTED_LAYOUT[name] in msg


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYOUT))
def test_root_required(name):
    with pytest.raises(PddError, match="data.root"):
        load_dataset(name, None)


def test_cifar_python_only_layout_asks_for_binary(tmp_path):
    write_fake_cifar10_python(tmp_path)
    with pytest.raises(PddError, match=r"python \(pickle\) version.*cifar-10-binary\.tar\.gz"):
        load_dataset("cifar10", str(tmp_path))


def test_corrupt_files_are_pdd_errors(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(PddError, match="test_batch.bin has 100 bytes"):
        load_dataset("cifar10", str(tmp_path))
    write_fake_mnist(tmp_path / "m")
    (tmp_path / "m" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(PddError, match="truncated or corrupt"):
        load_dataset("mnist", str(tmp_path / "m"))


def test_unknown_name_suggests_closest():
    with pytest.raises(PddError, match=r"did you mean 'cifar10'") as info:
        load_dataset("cifar1")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(PddError, match="unknown dataset"):
        load_dataset("zzzz")


@pytest.mark.parametrize("kwargs,match", [
    (dict(val_fraction=0.6), r"val_fraction=0.6: expected a number in \[0, 0.5\]"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(test_fraction=0.0), r"test_fraction=0.0: expected a number in \(0, 0.5\]"),
    (dict(test_fraction=0.7), "test_fraction"),
    (dict(val_fraction=float("nan")), "val_fraction"),
    (dict(val_fraction=True), "val_fraction"),
    (dict(seed="1"), "seed"),
    (dict(image_size=0), "image_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(PddError, match=match):
        load_dataset("digits", **kwargs)
