"""Tests for the Arrow expert-trajectory store: exact round trips, atomic writes, and
loud, one-line failures for the files a crashed or mismatched run leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

import pdd_ray.experts.store as store_mod
from pdd_ray.errors import PddError
from pdd_ray.experts.store import TrajectoryStore, store_key

KEY = "0123456789abcdef"
META = {"dataset_digest": "d1", "param_count": 1000, "model": {"name": "convnet", "width": 128}}


def _params(rows: int = 5, count: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, count)).astype(np.float32)


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- store_key


def test_store_key_is_stable_across_ordering_and_sensitive_to_values() -> None:
    a = {"lr": 0.01, "epochs": 50, "model": {"width": 128, "depth": 3}, "aug": ["flip", "crop"]}
    b = {"aug": ["flip", "crop"], "model": {"depth": 3, "width": 128}, "epochs": 50, "lr": 0.01}
    key = store_key(a)
    assert key == store_key(b)
    assert len(key) == 16 and int(key, 16) >= 0
    assert store_key({**a, "aug": ("flip", "crop")}) == key  # tuples are lists in JSON
    variants = [
        {**a, "lr": 0.010000001},
        {**a, "epochs": 51},
        {**a, "model": {"width": 128, "depth": 4}},
        {**a, "aug": ["crop", "flip"]},
        {**a, "extra": None},
    ]
    keys = {store_key(v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_store_key_rejects_ambiguous_values() -> None:
    with pytest.raises(PddError, match="non-string key"):
        store_key({1: "a"})
    with pytest.raises(PddError, match=r"settings\['x'\] is set"):
        store_key({"x": {1, 2}})


# --------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_identical_including_special_floats(tmp_path: Path) -> None:
    params = _params()
    specials = np.array([0x7FC00000, 0x7FA00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 1], np.uint32)
    params[2, : specials.size] = specials.view(np.float32)  # NaNs with payloads, +-inf, -0.0, denormal
    store = TrajectoryStore(str(tmp_path))
    path = store.write(KEY, 3, params, META)
    assert path == os.path.join(str(tmp_path), KEY, "expert_00003.arrow")
    with store.open(KEY, 3) as reader:
        assert (reader.num_rows, reader.param_count, reader.epochs) == (5, 1000, [0, 1, 2, 3, 4])
        assert reader.meta == META and reader.path == path
        for t in range(5):
            got = reader.params(t)
            assert got.dtype == np.float32 and got.shape == (1000,)
            np.testing.assert_array_equal(got.view(np.uint32), params[t].view(np.uint32))
        np.testing.assert_array_equal(reader.params(-1).view(np.uint32), params[4].view(np.uint32))


def test_epochs_mapping(tmp_path: Path) -> None:
    params = _params(rows=4, count=10)
    store = TrajectoryStore(str(tmp_path))
    store.write(KEY, 0, params, META, epochs=[0, 5, 10, 20])
    with store.open(KEY, 0) as reader:
        assert reader.epochs == [0, 5, 10, 20]
        np.testing.assert_array_equal(reader.params_at_epoch(10), params[2])
        np.testing.assert_array_equal(reader.params_at_epoch(20), params[3])
        with pytest.raises(PddError, match=r"epoch 7 was not saved .*\[0, 5, 10, 20\]"):
            reader.params_at_epoch(7)
        with pytest.raises(PddError, match=r"row 4 is out of range .* 0\.\.3"):
            reader.params(4)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"params": np.zeros((3, 4), np.float64)}, "float64 array"),
        ({"params": np.zeros(4, np.float32)}, "2-D"),
        ({"epochs": [0, 2, 1]}, "strictly increasing"),
        ({"epochs": [0, 1]}, "has 2 entries but params has 3 rows"),
        ({"meta": {"when": object()}}, r"meta\['when'\]"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, kwargs: dict, needle: str) -> None:
    args = {"params": np.zeros((3, 4), np.float32), "meta": META, **kwargs}
    store = TrajectoryStore(str(tmp_path))
    with pytest.raises(PddError, match=needle) as excinfo:
        store.write(KEY, 0, **args)
    _one_line_error(excinfo)
    assert store.indices(KEY) == []
    with pytest.raises(PddError, match="store key"):
        store.write("../escape", 0, np.zeros((1, 1), np.float32), META)


# --------------------------------------------------------------------------- roots


def test_file_uri_and_relative_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(rows=2, count=8)
    uri_store = TrajectoryStore(tmp_path.as_uri())  # file:///...
    assert uri_store.root == str(tmp_path)
    uri_store.write(KEY, 1, params, META)

    monkeypatch.chdir(tmp_path.parent)
    rel_store = TrajectoryStore(tmp_path.name)
    assert os.path.isabs(rel_store.root) and rel_store.root == str(tmp_path)
    assert rel_store.indices(KEY) == [1]
    with rel_store.open(KEY, 1) as reader:
        np.testing.assert_array_equal(reader.params(1), params[1])
    rel_store.write(KEY, 2, params, META)
    assert uri_store.indices(KEY) == [1, 2]


def test_non_local_filesystem_uses_random_access_path(tmp_path: Path) -> None:
    """A non-LocalFileSystem (as S3/GCS would be) goes through open_input_file, not mmap."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = TrajectoryStore("experts", filesystem=fs)
    params = _params(rows=3, count=16)
    store.write(KEY, 0, params, META)
    assert (tmp_path / "experts" / KEY / "expert_00000.arrow").is_file()
    assert store.indices(KEY) == [0]
    with store.open(KEY, 0, expect={"dataset_digest": "d1"}) as reader:
        assert not reader.memory_mapped
        np.testing.assert_array_equal(reader.params(2), params[2])
    store.write_json("manifest.json", {"n": 1})
    assert store.read_json("manifest.json") == {"n": 1}


def test_bad_uri_is_rejected() -> None:
    with pytest.raises(PddError, match=r"'nosuchscheme://x/y' is not a usable URI") as excinfo:
        TrajectoryStore("nosuchscheme://x/y")
    _one_line_error(excinfo)
    with pytest.raises(PddError, match="empty"):
        TrajectoryStore("")


# --------------------------------------------------------------------------- atomicity


def _break_after_two_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    real = store_mod._row_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("worker died midway")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_row_batch", flaky)


def test_failed_write_leaves_no_final_file_and_cleans_its_temp(tmp_path: Path, monkeypatch) -> None:
    store = TrajectoryStore(str(tmp_path))
    store.write(KEY, 0, _params(), META)
    _break_after_two_rows(monkeypatch)
    with pytest.raises(RuntimeError, match="midway"):
        store.write(KEY, 1, _params(), META)
    assert not store.exists(KEY, 1) and store.indices(KEY) == [0]
    assert sorted(os.listdir(tmp_path / KEY)) == ["expert_00000.arrow"]


def test_hard_crash_leaves_only_a_temp_that_clean_temp_removes(tmp_path: Path, monkeypatch) -> None:
    store = TrajectoryStore(str(tmp_path))
    store.write(KEY, 0, _params(), META)
    _break_after_two_rows(monkeypatch)
    monkeypatch.setattr(TrajectoryStore, "_discard", lambda self, path: None)  # killed: no cleanup ran
    with pytest.raises(RuntimeError):
        store.write(KEY, 1, _params(), META)
    temps = [n for n in os.listdir(tmp_path / KEY) if ".tmp-" in n]
    assert len(temps) == 1 and temps[0].startswith("expert_00001.arrow.tmp-")
    assert (tmp_path / KEY / temps[0]).stat().st_size > 0  # half written
    assert not store.exists(KEY, 1) and store.indices(KEY) == [0]
    assert store.clean_temp(KEY) == 1
    assert os.listdir(tmp_path / KEY) == ["expert_00000.arrow"]
    assert store.clean_temp(KEY) == 0 and store.clean_temp("missingkey") == 0


def test_indices_lists_only_complete_expert_files(tmp_path: Path) -> None:
    store = TrajectoryStore(str(tmp_path))
    assert store.indices(KEY) == []
    for i in (7, 2, 10):
        store.write(KEY, i, _params(rows=1, count=3), META)
    d = tmp_path / KEY
    (d / "expert_00004.arrow.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"partial")
    (d / "expert_000005.arrow").write_bytes(b"")  # not a name we write
    (d / "notes.txt").write_text("hi")
    assert store.indices(KEY) == [2, 7, 10]
    assert store.exists(KEY, 7) and not store.exists(KEY, 4)


# --------------------------------------------------------------------------- damaged files


def test_truncated_and_garbage_files_raise_one_line_error(tmp_path: Path) -> None:
    store = TrajectoryStore(str(tmp_path))
    path = Path(store.write(KEY, 0, _params(), META))
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"this is not an arrow file at all" * 10, b""):
        path.write_bytes(damaged)
        with pytest.raises(PddError, match="truncated or corrupt") as excinfo:
            store.open(KEY, 0)
        message = _one_line_error(excinfo)
        assert str(path) in message and "pdd-ray experts" in message
    with pytest.raises(PddError, match="does not exist"):
        store.open(KEY, 99)


def test_expect_mismatch_names_field_and_both_values(tmp_path: Path) -> None:
    store = TrajectoryStore(str(tmp_path))
    path = store.write(KEY, 0, _params(), META)
    with store.open(KEY, 0, expect={"dataset_digest": "d1", "model": {"width": 128, "name": "convnet"}}) as r:
        assert r.meta["param_count"] == 1000
    with pytest.raises(PddError) as excinfo:
        store.open(KEY, 0, expect={"dataset_digest": "d1", "param_count": 999})
    message = _one_line_error(excinfo)
    assert path in message and "'param_count'" in message and "1000" in message and "999" in message
    with pytest.raises(PddError, match="no meta field 'seed'"):
        store.open(KEY, 0, expect={"seed": 3})


# --------------------------------------------------------------------------- random access


def test_random_access_reads_each_row_from_the_memory_map(tmp_path: Path) -> None:
    params = _params(rows=20, count=50_000, seed=3)
    store = TrajectoryStore(str(tmp_path))
    store.write(KEY, 0, params, META)
    with store.open(KEY, 0) as reader:
        assert reader.memory_mapped
        for t in np.random.default_rng(0).permutation(20):
            np.testing.assert_array_equal(reader.params(int(t)), params[t])
        first, again = reader.params(11), reader.params(11)
        assert np.shares_memory(first, again)  # both views into the one mapping: no copy
        assert not first.flags.writeable
        assert not np.shares_memory(first, reader.params(12))
    np.testing.assert_array_equal(first, params[11])  # views outlive close()
    with pytest.raises(PddError, match="closed"):
        reader.params(0)


# --------------------------------------------------------------------------- JSON side files


def test_json_side_files_round_trip_atomically(tmp_path: Path) -> None:
    store = TrajectoryStore(str(tmp_path))
    assert store.read_json("manifests/run.json") is None
    manifest = {"key": KEY, "experts": [0, 1, 2], "lr": 0.01, "nested": {"a": None}}
    store.write_json("manifests/run.json", manifest)
    assert store.read_json("manifests/run.json") == manifest
    store.write_json("manifests/run.json", {"key": KEY, "experts": []})  # replace in place
    assert store.read_json("manifests/run.json") == {"key": KEY, "experts": []}
    assert os.listdir(tmp_path / "manifests") == ["run.json"]  # no temp left behind
    (tmp_path / "manifests" / "bad.json").write_text("{not json")
    with pytest.raises(PddError, match="bad.json is corrupt"):
        store.read_json("manifests/bad.json")
    with pytest.raises(PddError, match="relative path inside"):
        store.write_json("../outside.json", {})
