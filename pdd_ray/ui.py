"""``pdd-ray ui``: browse a run's MLflow store in the browser, bound to 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pdd_ray.errors import PddError
from pdd_ray.mlflow_store import ensure_store


def free_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_store(path: str) -> Path:
    """``mlflow.db`` in ``path`` or in the storage folder of a preset run (outputs/<name>)."""
    p = Path(path).expanduser().resolve()
    for candidate in (p if p.suffix == ".db" else p / "mlflow.db",):
        if candidate.is_file():
            return candidate
    found = sorted(p.glob("*/mlflow.db")) if p.is_dir() else []
    if len(found) == 1:
        return found[0]
    hint = f"; found several: {', '.join(str(f.parent) for f in found)}" if found else ""
    raise PddError(f"no MLflow store (mlflow.db) in {p}{hint}; pass the run's storage folder, e.g. outputs/digits")


def start_server(db: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """A lightweight ``mlflow server`` (one worker, no job execution: ~0.5 GB instead of ~3 GB)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--host", host, "--port", str(port), "--workers", "1",
           "--artifacts-destination", str(db.parent / "mlartifacts")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll ``/health`` until the server answers, or fail with its own error line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise PddError(f"mlflow server exited with status {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise PddError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it forked (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def experiment_runs_url(base: str, db: Path, experiment: str = "pdd_ray") -> str:
    """URL of the runs table of ``experiment`` (the bare experiment URL opens an overview)."""
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment_by_name(experiment)
    return f"{base}/#/experiments/{exp.experiment_id}/runs" if exp is not None else base


def serve(path: str, port: int | None = None, experiment: str = "pdd_ray") -> int:
    """Start the UI, print its URL, and stop cleanly on Ctrl-C."""
    db = find_store(path)
    ensure_store(f"sqlite:///{db}")  # a half-migrated store: one line naming the fix, not a server crash
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(db, port)
    try:
        wait_healthy(base, proc)
        print(f"MLflow UI for {db.parent}: {experiment_runs_url(base, db, experiment)}  (Ctrl-C to stop)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        print("stopping the MLflow server", file=sys.stderr)
    finally:
        stop_server(proc)
    return 0
