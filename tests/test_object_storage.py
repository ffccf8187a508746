"""Runs in an object store (issue 12, fault 3): ``storage=s3://...`` against a real S3-compatible
server (moto in server mode, on loopback, started by the test), as a cluster user would run.

The endpoint and credentials reach every process the usual way (``AWS_ENDPOINT_URL``...): the
run is a ``pdd-ray run`` subprocess with its own Ray, so its Train workers and expert actors
inherit them like the nodes of a cluster would.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from moto.server import ThreadedMotoServer

from pdd_ray import load_distilled
from pdd_ray.config import load_config
from pdd_ray.distill.identity import run_dir
from pdd_ray.distill.records import StageOutcome, load_stage, save_stage
from pdd_ray.errors import PddError
from pdd_ray.runtime import ensure_storage
from pdd_ray.storage import Folder

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "pdd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A loopback S3 server with one bucket; yields the AWS variables that point at it."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _outcome() -> StageOutcome:
    g = torch.Generator().manual_seed(0)
    return StageOutcome(torch.randn(10, 1, 8, 8, generator=g), torch.arange(10), 0.01, 0.9, 3,
                        [1.0, 0.5], [(0, 0.5), (2, 0.9)])


def test_stage_record_round_trips_in_s3_and_damage_is_refused(s3_env):
    d = Folder.at(f"s3://{BUCKET}/records")
    save_stage(d, 1, _outcome())
    assert {f.name for f in (d / "stage_1").files()} == {"stage.npz", "manifest.json"}
    back = load_stage(f"s3://{BUCKET}/records", 1)
    assert torch.equal(back.images, _outcome().images) and back.val_history == _outcome().val_history
    assert load_stage(d, 2) is None
    npz = d / "stage_1" / "stage.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(PddError, match=r"stage record s3://.* is damaged: stage.npz does not match"):
        load_stage(d, 1)


def test_upload_writes_the_completion_marker_last_and_replaces_old_files(s3_env, tmp_path):
    order: list[str] = []
    target = Folder.at(f"s3://{BUCKET}/up")
    (target / "stale.npz").write_bytes(b"old")
    for name in ("a.npz", "manifest.json", "z.png"):
        (tmp_path / name).write_bytes(name.encode())
    real_write = Folder.write_bytes
    try:
        Folder.write_bytes = lambda self, data: (order.append(self.name), real_write(self, data))[1]
        target.upload(tmp_path, last="manifest.json")
    finally:
        Folder.write_bytes = real_write
    assert order[-1] == "manifest.json" and sorted(order) == ["a.npz", "manifest.json", "z.png"]
    assert [f.name for f in target.files()] == ["a.npz", "manifest.json", "z.png"]  # stale.npz is gone
    assert (target / "z.png").read_bytes() == b"z.png"


def test_missing_bucket_is_one_line_before_any_work(s3_env):
    cfg = load_config("digits", [f"storage=s3://no-such-bucket-{os.getpid()}/x"])
    with pytest.raises(PddError) as err:
        ensure_storage(cfg)
    assert "\n" not in str(err.value) and "no-such-bucket" in str(err.value) and "does not exist" in str(err.value)


def _run_argv(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pdd_ray", "run", "digits", *overrides, "--no-progress"]


def _wait_for(fs: pafs.FileSystem, prefix: str, suffix: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        if any(i.path.endswith(suffix) for i in infos):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError(f"nothing ending in {suffix} under {prefix} after {timeout} s")


@pytest.mark.slow
def test_run_in_s3_resumes_after_sigkill_and_its_artifact_loads_by_uri(s3_env, tmp_path, tiny_overrides):
    """`pdd-ray run digits storage=s3://...`: killed (SIGKILL, the whole process group) once stage 2
    has a Train checkpoint in the bucket; the re-run reuses stage 1's record, finishes stage 2 from
    there, writes the artifact and results to the bucket and nothing to the local disk."""
    storage = f"s3://{BUCKET}/run"
    overrides = [*tiny_overrides(storage), "distill.iterations=12", "distill.checkpoint_every=2"]
    cfg = load_config("digits", overrides)
    directory = run_dir(cfg)
    assert str(directory).startswith(f"s3://{BUCKET}/run/runs/tiny-")
    env = {**os.environ, **s3_env, "PYTHONPATH": str(ROOT)}
    ray_tmp = tempfile.mkdtemp(prefix="pdr", dir="/tmp")
    proc = subprocess.Popen(_run_argv(overrides), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**env, "RAY_TMPDIR": ray_tmp})
    try:
        _wait_for(directory.fs, f"{directory.path}/train/stage_2", "state.pt", proc, timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stage1 = (directory / "stage_1" / "stage.npz").read_bytes()
    assert not (directory / "stage_2" / "manifest.json").exists() and not (directory / "artifact").exists()

    rerun = subprocess.run(_run_argv(overrides), cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env={**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="pdr", dir="/tmp")})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"stage 1/2: finished earlier, read from {directory}/stage_1" in rerun.stderr + rerun.stdout
    assert (directory / "stage_1" / "stage.npz").read_bytes() == stage1  # not distilled again
    stage2 = load_stage(directory, 2)
    assert len(stage2.losses) == 12  # the killed stage went on from its checkpoint: no gap, no repeat
    art = load_distilled(f"{directory}/artifact")
    assert len(art.stages) == 2 and torch.equal(art.stages[1].images, stage2.images.float())
    results = json.loads((directory / "results.json").read_text())
    assert results["pdd"] and results["random"]
    assert (Folder.at(storage) / "baselines").files()  # the baseline cache went to the bucket too
    with np.load(io.BytesIO((directory / "artifact" / "stage_1.npz").read_bytes()), allow_pickle=False) as z:
        assert z["images"].shape[0] == 10
    assert not any(p.name.startswith(("s3:", BUCKET)) for p in tmp_path.iterdir())  # nothing landed locally


def test_tracking_with_object_storage_defaults_to_a_local_store_and_logs_fetched_files(s3_env, tmp_path, monkeypatch,
                                                                                      capsys):
    """MLflow's SQLite store needs a local file: with s3 storage it goes under ~/.pdd_ray, said once;
    the artifact and results.json are fetched from the bucket before MLflow logs them."""
    from pdd_ray.tracking import RunTracker, tracking_uri

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("digits", [f"storage=s3://{BUCKET}/t"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/.pdd_ray/mlflow.db"
    assert "is an object store" in capsys.readouterr().err
    run = Folder.at(f"s3://{BUCKET}/t/runs/r")
    (run / "artifact" / "manifest.json").write_text("{}")
    (run / "artifact" / "stage_1.npz").write_bytes(b"npz")
    (run / "results.json").write_text('{"pdd": 1}')
    logged: list[tuple[str, dict]] = []

    class Client:
        def log_artifacts(self, run_id, local_dir, artifact_path=None):
            logged.append((artifact_path, {p.name: p.read_bytes() for p in Path(local_dir).iterdir()}))

        def log_artifact(self, run_id, local_path, artifact_path=None):
            logged.append((artifact_path, {Path(local_path).name: Path(local_path).read_bytes()}))

    tracker = object.__new__(RunTracker)
    tracker.client, tracker.run_id = Client(), "r1"
    tracker._log_run_files(run / "artifact", run / "results.json")
    assert logged == [("artifact", {"manifest.json": b"{}", "stage_1.npz": b"npz"}),
                      (None, {"results.json": b'{"pdd": 1}'})]
