"""Tests for pdd_ray.data.zca: whitening maths, inverse, persistence without pickle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdd_ray.data import ZCA, load_dataset
from pdd_ray.errors import PddError


@pytest.fixture(scope="module")
def digits_x() -> torch.Tensor:
    return load_dataset("digits", normalize=False).train_x


def random_images(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 8, 8, generator=g)
    return base + 0.5 * base.roll(1, dims=3)  # correlated neighbouring pixels, like images


def covariance(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1).to(torch.float64)
    flat = flat - flat.mean(0)
    return flat.T @ flat / (len(x) - 1)


@pytest.mark.parametrize("source", ["digits", "random"])
def test_inverse_undoes_apply(digits_x, source):
    x = digits_x if source == "digits" else random_images()
    zca = ZCA.fit(x, eps=0.1)
    white = zca.apply(x)
    assert white.shape == x.shape and white.dtype == torch.float32
    assert torch.allclose(zca.inverse(white), x, atol=1e-4)
    assert zca.mean.dtype == zca.matrix.dtype == zca.inverse_matrix.dtype == torch.float32
    identity = torch.eye(zca.dim, dtype=torch.float64)
    assert torch.allclose(zca.matrix.double() @ zca.inverse_matrix.double(), identity, atol=1e-3)


def test_whitened_covariance_is_shrunk_identity():
    x = random_images(n=2000)
    eps = 0.1
    cov = covariance(x)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    white_cov = covariance(ZCA.fit(x, eps=eps).apply(x))
    # In the eigenbasis the whitened covariance is diag(S / (S + eps)).
    in_basis = eigvecs.T @ white_cov @ eigvecs
    assert torch.allclose(in_basis, torch.diag(eigvals / (eigvals + eps)), atol=1e-4)


def test_tiny_eps_gives_identity_covariance():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(12, 12, generator=g)
    x = (torch.randn(5000, 12, generator=g) @ mix).reshape(5000, 3, 2, 2)  # D=12, N >> D
    white = ZCA.fit(x, eps=1e-8).apply(x)
    assert torch.allclose(covariance(white), torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert white.mean(0).abs().max() < 1e-4


def test_matches_kornia_formula_and_symmetry():
    x = random_images(n=300)
    zca = ZCA.fit(x, eps=0.1)
    flat = x.reshape(len(x), -1).double()
    cov = covariance(x)
    u, s, _ = torch.linalg.svd(cov)
    expected = u @ torch.diag(1.0 / torch.sqrt(s + 0.1)) @ u.T
    assert torch.allclose(zca.matrix.double(), expected, atol=1e-5)
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-6)
    assert torch.allclose(zca.mean.double(), flat.mean(0), atol=1e-6)


def test_apply_keeps_shape_and_accepts_empty_batches(digits_x):
    zca = ZCA.fit(digits_x)
    assert zca.apply(digits_x[:0]).shape == (0, 1, 8, 8)
    assert zca.inverse(digits_x[:3].double()).dtype == torch.float64  # follows the input dtype
    with pytest.raises(PddError, match="64 features"):
        zca.apply(torch.zeros(2, 3, 8, 8))


def test_save_load_round_trip_is_bit_identical(tmp_path, digits_x):
    zca = ZCA.fit(digits_x, eps=0.05)
    path = tmp_path / "sub" / "zca.npz"
    zca.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["zca.npz"]  # no temp file left behind
    back = ZCA.load(path)
    for name in ("mean", "matrix", "inverse_matrix"):
        assert np.array_equal(getattr(back, name).numpy(), getattr(zca, name).numpy())
    assert back.eps == zca.eps == 0.05
    assert back.digest == zca.digest and len(zca.digest) == 16
    assert ZCA.fit(digits_x, eps=0.05).digest == zca.digest  # deterministic fit
    assert ZCA.fit(digits_x, eps=0.1).digest != zca.digest
    zca.save(path)  # overwrite in place
    assert ZCA.load(path).digest == zca.digest


def test_load_missing_or_corrupt_is_pdd_error(tmp_path, digits_x):
    with pytest.raises(PddError, match="does not exist"):
        ZCA.load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage, not a zip")
    with pytest.raises(PddError, match="corrupt"):
        ZCA.load(bad)
    good = tmp_path / "good.npz"
    ZCA.fit(digits_x).save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(PddError):
        ZCA.load(truncated)
    missing_key = tmp_path / "partial.npz"
    np.savez(missing_key, mean=np.zeros(4, np.float32))
    with pytest.raises(PddError):
        ZCA.load(missing_key)


def test_load_refuses_pickled_object_arrays(tmp_path):
    """np.load runs with allow_pickle=False: an object array (pickle inside) is refused."""
    path = tmp_path / "evil.npz"
    np.savez(path, format=np.int64(1), eps=np.float64(0.1), mean=np.array([{"x": 1}], dtype=object),
             matrix=np.zeros((1, 1), np.float32), inverse_matrix=np.zeros((1, 1), np.float32))
    with pytest.raises(PddError, match="corrupt"):
        ZCA.load(path)


@pytest.mark.parametrize("bad", [dict(eps=0.0), dict(eps=-1.0), dict(eps=float("nan")),
                                 dict(x=torch.zeros(1, 1, 2, 2)), dict(x=torch.zeros(4, 4, dtype=torch.long))])
def test_fit_bad_inputs(bad):
    args = dict(x=torch.randn(8, 1, 2, 2), eps=0.1) | bad
    with pytest.raises(PddError):
        ZCA.fit(**args)
