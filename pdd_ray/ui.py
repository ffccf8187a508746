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


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    """Poll ``/health`` until the server answers, or fail with its own error line (the limit is
    generous: on a loaded machine the server alone took minutes to import and start)."""
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


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``.

    Read from /proc where there is one: an orphaned worker re-parented to a PID 1 that does not
    reap leaves a zombie, which ``killpg(pgid, 0)`` would still count.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    alive = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


def stop_server(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the server and every process it started (its own process group): SIGTERM, wait
    until none is left, SIGKILL whatever still is after ``grace`` seconds.

    Waiting for the group leader alone is not enough: its uvicorn worker can outlive it.
    """
    pgid = proc.pid  # start_new_session: the server leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace
    while time.time() < deadline:
        if proc.poll() is not None and not group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)


def experiment_runs_url(base: str, db: Path, experiment: str = "pdd_ray") -> str:
    """URL of the runs table of ``experiment`` (the bare experiment URL opens an overview).

    Asked of the running server over REST, so this process never imports MLflow or opens the
    store itself (that alone took half a minute on a busy machine). The query opens MLflow 3's
    training view (``workflowType``) and, when the experiment carries pdd_ray's saved view,
    that view (its columns and sort order; see :func:`pdd_ray.tracking.runs_view_state`).
    """
    import json
    from urllib.parse import quote

    from pdd_ray.tracking import RUNS_VIEW_KEY, SHARED_VIEW_TAG_PREFIX

    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(experiment)}",
                                    timeout=30) as r:
            exp = json.loads(r.read())["experiment"]
    except (OSError, ValueError, KeyError):
        return base
    query = "workflowType=machine_learning"
    if any(t.get("key") == SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY for t in exp.get("tags", [])):
        query += f"&viewStateShareKey={RUNS_VIEW_KEY}"
    return f"{base}/#/experiments/{exp['experiment_id']}/runs?{query}"


class _Stop(Exception):
    """Raised by the signal handlers so that ``serve``'s ``finally`` stops the server."""


def _raise_stop(signum: int, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(path: str, port: int | None = None, experiment: str = "pdd_ray") -> int:
    """Start the UI, print its URL as soon as the server answers, and stop everything on
    Ctrl-C, SIGTERM or SIGHUP.

    The server runs in its own process group (so a terminal's Ctrl-C reaches only us and we
    stop it in order); SIGTERM and SIGHUP would otherwise end this process without cleanup and
    leave ``mlflow server`` and its uvicorn worker holding the port, so all three signals raise
    into the ``finally`` that stops the whole group.
    """
    db = find_store(path)
    ensure_store(f"sqlite:///{db}")  # a half-migrated store: one line naming the fix, not a server crash
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    previous = {s: signal.signal(s, _raise_stop) for s in STOP_SIGNALS}
    proc = None
    try:
        proc = start_server(db, port)
        print(f"starting the MLflow server for {db.parent} on {base} ...", file=sys.stderr, flush=True)
        wait_healthy(base, proc)
        print(f"MLflow UI for {db.parent}: {experiment_runs_url(base, db, experiment)}  (Ctrl-C to stop)", flush=True)
        proc.wait()
    except (KeyboardInterrupt, _Stop) as why:
        print(f"stopping the MLflow server ({why or 'SIGINT'})", file=sys.stderr, flush=True)
    finally:
        for s in STOP_SIGNALS:  # a second signal must not interrupt the cleanup itself
            signal.signal(s, signal.SIG_IGN)
        try:
            if proc is not None:
                stop_server(proc)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return 0
