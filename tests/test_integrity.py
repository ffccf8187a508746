"""Damage inside files is detected on read (issue 17, item 2): trajectory snapshots carry a
CRC-32 each, stage records and artifacts a SHA-256 per file. No Ray: plain files only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

import pdd_ray.experts.store as store_mod
from pdd_ray.distill.artifact import DataSpace, load_distilled, write_artifact
from pdd_ray.distill.records import StageOutcome, load_stage, save_stage
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet
from pdd_ray.experts.store import TrajectoryStore
from pdd_ray.modelspec import ModelSpec
from pdd_ray.training import TrainRecipe

KEY = "0123456789abcdef"


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _expert(tmp_path: Path) -> tuple[TrajectoryStore, np.ndarray, Path]:
    params = np.random.default_rng(0).standard_normal((6, 4000)).astype(np.float32)
    store = TrajectoryStore(str(tmp_path / "experts"))
    path = Path(store.write(KEY, 0, params, {"param_count": 4000}))
    return store, params, path


def _read_all(store: TrajectoryStore) -> None:
    with store.open(KEY, 0) as r:
        for row in range(r.num_rows):
            r.params(row)


def test_flipped_bytes_inside_a_snapshot_are_caught(tmp_path):
    store, params, path = _expert(tmp_path)
    _read_all(store)  # intact: reads fine
    raw = path.read_bytes()
    at = raw.index(params[3].tobytes()[:64]) + 2000  # the middle of row 3's parameters
    _overwrite(path, at, b"\xff\x7f" * 8)  # NaNs and huge values, Arrow's structure untouched
    with store.open(KEY, 0) as r:
        np.testing.assert_array_equal(r.params(2), params[2])  # other rows are fine
        with pytest.raises(PddError, match=r"truncated or corrupt \(row 3 \(epoch 3\) does not match its checksum\)"):
            r.params(3)


def test_4kb_of_random_bytes_in_the_middle_is_a_one_line_error(tmp_path):
    """The issue's experiment: 4 KB of random bytes in the middle of expert_00000.arrow."""
    store, params, path = _expert(tmp_path)
    at = path.read_bytes().index(params[2].tobytes()[:64]) + 4096  # inside a snapshot's values, as there
    _overwrite(path, at, np.random.default_rng(7).bytes(4096))
    with pytest.raises(PddError, match="truncated or corrupt") as exc:
        _read_all(store)
    assert "\n" not in str(exc.value)


def test_each_snapshot_is_verified_once_per_reader(tmp_path, monkeypatch):
    store, _, _ = _expert(tmp_path)
    calls = []
    real = store_mod._row_crc
    monkeypatch.setattr(store_mod, "_row_crc", lambda values: calls.append(1) or real(values))
    with store.open(KEY, 0) as r:
        for _ in range(5):
            r.params(1)
            r.params_at_epoch(4)
    assert len(calls) == 2  # rows 1 and 4, once each


def test_files_written_before_checksums_still_read(tmp_path):
    store, params, path = _expert(tmp_path)
    with pa.memory_map(str(path)) as src:  # rewrite it exactly as the old writer did: no crc entry
        reader = ipc.open_file(src)
        md = {k: v for k, v in reader.schema.metadata.items() if k != b"pdd_ray.crc32"}
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        schema = reader.schema.with_metadata(md)
        old = path.with_name("old.arrow")
        with ipc.new_file(str(old), schema) as w:
            for b in batches:
                w.write_batch(b)
    old.replace(path)
    with store.open(KEY, 0) as r:
        np.testing.assert_array_equal(r.params(5), params[5])


def _outcome() -> StageOutcome:
    g = torch.Generator().manual_seed(0)
    return StageOutcome(images=torch.randn(40, 1, 8, 8, generator=g), labels=torch.arange(10).repeat(4), alpha=0.01,
                        best_val_acc=0.5, best_iteration=4, losses=[1.0, 0.5, 0.25, 0.2],
                        val_history=[(0, 0.1), (2, 0.3), (4, 0.5)])


def test_damaged_stage_record_is_a_one_line_error(tmp_path):
    save_stage(tmp_path, 1, _outcome())
    back = load_stage(tmp_path, 1)
    assert torch.equal(back.images, _outcome().images) and back.val_history == _outcome().val_history
    npz = tmp_path / "stage_1" / "stage.npz"
    good = npz.read_bytes()
    _overwrite(npz, len(good) // 2, b"\x00\x01\x02\x03" * 4)
    with pytest.raises(PddError, match=r"stage record .*stage_1 is damaged: stage.npz does not match .*delete .*re-run"):
        load_stage(tmp_path, 1)
    npz.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(PddError, match=r"stage record .*stage_1 is damaged"):
        load_stage(tmp_path, 1)
    npz.write_bytes(good)
    manifest = tmp_path / "stage_1" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2] + "\x00garbage" + text[len(text) // 2 + 8:])
    with pytest.raises(PddError, match=r"stage record .*stage_1 is truncated or corrupt \(JSONDecodeError"):
        load_stage(tmp_path, 1)


def test_stage_record_without_digest_still_reads(tmp_path):
    save_stage(tmp_path, 1, _outcome())
    manifest = tmp_path / "stage_1" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["sha256"]  # as written before digests existed
    manifest.write_text(json.dumps(m))
    assert load_stage(tmp_path, 1).best_iteration == 4


def _artifact(tmp_path: Path) -> Path:
    o = _outcome()
    spec = ModelSpec(arch="convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2)
    return Path(write_artifact(tmp_path / "artifact", [StageSet(o.images, o.labels, lr=0.01, epochs=5)], spec,
                          DataSpace({"name": "digits", "digest": "d", "classes": [str(i) for i in range(10)],
                                     "shape": [1, 8, 8]}, (0.5,), (0.25,), None), TrainRecipe(epochs=5, lr=0.01), True, {"run_key": "k"}))


def test_damaged_artifact_is_refused(tmp_path):
    art = _artifact(tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"stage_1.npz", "grid_stage_1.png"}
    assert torch.equal(load_distilled(art).images, _outcome().images)
    npz = art / "stage_1.npz"
    size = npz.stat().st_size
    _overwrite(npz, size // 2, b"\xde\xad\xbe\xef")
    with pytest.raises(PddError, match=r"artifact .* is damaged: stage_1.npz does not match its recorded sha256"):
        load_distilled(art)
    npz.unlink()
    with pytest.raises(PddError, match=r"artifact .* is incomplete: stage_1.npz is missing"):
        load_distilled(art)


def test_artifact_without_digests_still_loads(tmp_path):
    art = _artifact(tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["sha256"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(load_distilled(art).labels, _outcome().labels)
