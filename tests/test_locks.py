"""Cross-process locks and the MLflow store's one-time creation (no Ray, a few seconds each)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pdd_ray.errors import PddError
from pdd_ray.locks import LockTimeout, file_lock
from pdd_ray.mlflow_store import ensure_store

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_lock_excludes_another_process_and_dies_with_it(tmp_path):
    lock, held = tmp_path / "x.lock", tmp_path / "held"
    code = textwrap.dedent(f"""
        import time
        from pdd_ray.locks import file_lock
        with file_lock({str(lock)!r}, "thing"):
            open({str(held)!r}, "w").close()
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stderr=subprocess.PIPE)
    try:
        _wait_for(held, proc)
        with pytest.raises(LockTimeout, match=rf"thing is still locked by pid {proc.pid} on host"):
            with file_lock(lock, "thing", timeout=0.6, poll=0.1):
                pass
        proc.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock behind
        proc.wait(timeout=30)
        t0 = time.monotonic()
        with file_lock(lock, "thing", timeout=5, poll=0.1):
            pass
        assert time.monotonic() - t0 < 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lock_is_reentrant_in_a_thread_and_excludes_other_threads(tmp_path):
    lock = tmp_path / "x.lock"
    got = []
    with file_lock(lock, "thing"):
        with file_lock(lock, "thing", timeout=1):  # nested use in one thread does not deadlock
            got.append("nested")

        def other() -> None:
            try:
                with file_lock(lock, "thing", timeout=0.3):
                    got.append("other thread got it")
            except LockTimeout:
                got.append("other thread waited")

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert got == ["nested", "other thread waited"]
    with file_lock(lock, "thing", timeout=1):  # fully released afterwards
        pass


_TRACKER = """
import os, sys, time
go = sys.argv[2]
from pdd_ray.config import load_config
from pdd_ray.tracking import RunTracker
cfg = load_config("digits", [f"storage={sys.argv[1]}", "tracking.enabled=true"])
import mlflow.store.tracking.sqlalchemy_store  # heavy imports done before the barrier
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
tracker = RunTracker(cfg, run_name="concurrent")
tracker.finish()
"""


def test_concurrent_runs_create_the_mlflow_store_once(tmp_path):
    """Three processes open a new sqlite store at the same instant (the issue's alembic race)."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TRACKER, str(tmp_path), str(go)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    deadline = time.monotonic() + 600  # imports are slow on a loaded machine
    while len(list(tmp_path.glob("go.ready-*"))) < len(procs):  # all imported, waiting at the barrier
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process died early"
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    errors = [err.decode().strip().splitlines()[-1] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert not errors, errors
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("pdd_ray")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)


def test_half_migrated_store_is_refused_with_the_fix(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    ensure_store(uri)
    ensure_store(uri)  # a whole store passes, again and again
    con = sqlite3.connect(db)  # the state two racing creations left in the reproduction
    con.execute("UPDATE alembic_version SET version_num = '4465047574b1'")
    con.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250))")
    con.commit()
    con.close()
    from pdd_ray.config import load_config
    from pdd_ray.tracking import RunTracker

    cfg = load_config("digits", [f"storage={tmp_path}", "tracking.enabled=true"])
    with pytest.raises(PddError, match=r"half-created .*_alembic_tmp_tags.*mv .*mlflow.db .*mlflow.db.broken"):
        RunTracker(cfg)
    db.rename(db.with_name("mlflow.db.broken"))  # the fix it names works (in a new process, as a re-run is:
    go = tmp_path / "go"  # this one's MLflow keeps its engine on the moved file)
    go.touch()
    proc = subprocess.run([sys.executable, "-c", _TRACKER, str(tmp_path), str(go)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unreadable_store_is_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PddError, match=r"not a readable sqlite database.*mv "):
        ensure_store(f"sqlite:///{db}")
