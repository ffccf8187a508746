"""Exit status, interrupts and stale MLflow runs (issue 17 item 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pdd_ray.cli import main
from pdd_ray.config import load_config


ROOT = Path(__file__).resolve().parent.parent


def _tracked(tiny_overrides, storage: Path) -> list[str]:
    return [o for o in tiny_overrides(str(storage)) if not o.startswith("tracking")]


def _statuses(storage: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("pdd_ray")
    return {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id], max_results=1000)}


@pytest.mark.parametrize("key", ["storage", "experts.storage"])
def test_storage_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["experts", "digits", f"storage={tmp_path}/ok", f"{key}={blocker}/sub", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdd-ray: error: ") and "\n" not in err
    assert f"{blocker}/sub" in err and key in err


def test_runs_of_a_killed_process_are_marked_killed_on_resume(tmp_path, tiny_overrides):
    """A process that dies with its runs RUNNING (SIGKILL: no cleanup at all) leaves them to the
    next run of the same work, which marks them KILLED; a live owner's run is left alone."""
    from pdd_ray.tracking import RunTracker

    storage = tmp_path / "s"
    ov = _tracked(tiny_overrides, storage)
    code = (
        "import os, signal, sys\n"
        "from pdd_ray.config import load_config\n"
        "from pdd_ray.tracking import RunTracker, PARENT_TAG\n"
        f"cfg = load_config('digits', {ov!r})\n"
        "t = RunTracker(cfg)\n"
        "stage = t.client.create_run(t.experiment_id, tags={PARENT_TAG: t.run_id}, run_name='tiny/stage1')\n"
        "print(t.run_id, stage.info.run_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead_run, dead_stage = proc.stdout.split()
    assert _statuses(storage)[dead_run] == "RUNNING" and _statuses(storage)[dead_stage] == "RUNNING"

    cfg = load_config("digits", ov)
    live = RunTracker(cfg)  # this process: alive, so its run must survive the next claim
    other = load_config("digits", ov + ["distill.iterations=5"])  # other work: not this run's business
    other_run = RunTracker(other)
    resumed = RunTracker(cfg)
    st = _statuses(storage)
    assert st[dead_run] == "KILLED" and st[dead_stage] == "KILLED"
    assert st[live.run_id] == "RUNNING" and st[resumed.run_id] == "RUNNING" and st[other_run.run_id] == "RUNNING"
    for t in (live, other_run, resumed):
        t.finish()


def _ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the run's private Ray temp dir)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{p.name}: {cmd[:120]}")
    return found


def test_ctrl_c_during_a_stage_exits_130_and_closes_ray_and_mlflow(tmp_path, tiny_overrides):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while stage 1 trains on Ray
    Train: exit 130 with `pdd-ray: interrupted`, every MLflow run closed, no Ray process left."""
    storage = tmp_path / "s"
    ray_tmp = tempfile.mkdtemp(prefix="pdr", dir="/tmp")  # short: Ray's socket paths have a length limit
    argv = [sys.executable, "-m", "pdd_ray", "run", "digits", *_tracked(tiny_overrides, storage), "distill.iterations=400",
            "--no-progress"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp})
    try:
        deadline = time.monotonic() + 600
        while not list(storage.glob("runs/*/train/stage_1")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.5)
        time.sleep(3)  # well inside fit()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "pdd-ray: interrupted" in err.splitlines() and "Traceback" not in err, err[-3000:]
    statuses = _statuses(storage)
    assert statuses and "RUNNING" not in statuses.values(), statuses
    assert "KILLED" in statuses.values()
    time.sleep(2)
    assert _ray_processes(ray_tmp) == []
    assert _group_members(proc.pid) == []


def _group_members(pgid: int) -> list[str]:
    """Live processes still in the run's process group (Ray's children inherit it)."""
    left = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid:
                    left.append(p.name)
            except OSError:
                pass
    return left
