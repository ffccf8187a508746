"""MLflow tracking against a real server, Tune sweeps, and `pdd-ray ui`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pdd_ray.config import load_config
from pdd_ray.errors import PddError
from pdd_ray.ui import free_port, start_server, stop_server, wait_healthy


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as r:
        return json.loads(r.read())


def _runs(base: str, name: str) -> list[dict]:
    exp = _get(base, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")["experiment"]
    runs = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})
    return runs.get("runs", [])


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _artifacts(base: str, run_id: str, path: str = "") -> list[str]:
    res = _get(base, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path={path}")
    return [f["path"] for f in res.get("files", [])]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_server(root / "mlflow.db", port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        stop_server(proc)


def test_run_is_logged_to_a_real_server(ray_session, server, tmp_path, tiny_overrides):
    from pdd_ray.pipeline import run

    ov = [o for o in tiny_overrides(str(tmp_path)) if not o.startswith("tracking")]
    cfg = load_config("digits", ov + [f"tracking.uri={server}", "tracking.experiment=served"])
    run(cfg, progress=False)
    runs = _runs(server, "served")
    parents = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    assert len(parents) == 1
    parent = parents[0]
    pid = parent["info"]["run_id"]
    children = [r for r in runs if _tags(r).get("mlflow.parentRunId") == pid]
    assert sorted(_tags(c)["pdd.stage"] for c in children) == ["1", "2"]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["distill.num_stages"] == "2" and params["data.dataset"] == "digits"
    metrics = {m["key"] for m in parent["data"]["metrics"]}
    assert {"test_acc", "random_test_acc", "full_test_acc"} <= metrics
    # lineage: the real dataset and the expert stores as dataset inputs
    inputs = parent.get("inputs", {}).get("dataset_inputs", [])
    names = {i["dataset"]["name"] for i in inputs}
    assert "digits" in names and "experts-stage1" in names
    # the artifact and the figures on the parent; a stepped image series on each stage run
    assert "artifact/manifest.json" in _artifacts(server, pid, "artifact")
    assert {"accuracy_vs_stage.png", "matching_loss.png"} <= set(_artifacts(server, pid))
    for child in children:
        cid = child["info"]["run_id"]
        cm = {m["key"] for m in child["data"]["metrics"]}
        assert {"loss", "alpha", "grad_norm", "val_acc", "test_acc"} <= cm
        images = _artifacts(server, cid, "images")
        # MLflow names them images/<key>+step+<step>+timestamp+...png
        steps = {p.split("+step+")[1].split("+")[0] for p in images if "synthetic_images+step+" in p}
        assert len(steps) >= 2, images  # an image per evaluation: iterations 0, 2, 4
        # issue 16.3: each stage run carries its own settings to compare stages by
        cp = {p["key"]: p["value"] for p in child["data"].get("params", [])}
        k = int(_tags(child)["pdd.stage"])
        assert cp["stage.stage"] == str(k) and cp["stage.union_ipc"] == str(k)  # ipc_per_stage=1
        assert int(cp["stage.selected_iteration"]) in (0, 2, 4)
        stage_metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert float(cp["stage.alpha"]) == pytest.approx(stage_metrics["stage_alpha"], rel=1e-5)
        assert len(cp["stage.experts_key"]) >= 8 and cp["stage.experts_key"] != "none"
    stage_keys = {int(_tags(c)["pdd.stage"]): {p["key"]: p["value"] for p in c["data"]["params"]}["stage.experts_key"]
                  for c in children}
    assert stage_keys[1] != stage_keys[2]  # stage 2 matched the transition's experts
    assert "final_test_acc" in metrics


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory, tiny_overrides):
    from pdd_ray.sweep import load_sweep, run_sweep

    root = tmp_path_factory.mktemp("sweep")
    spec = {
        "name": "tiny-sweep",
        "base": "digits",
        "storage": str(root),
        # validation networks long enough to tell layouts apart (at 5 epochs every trial sits at chance and ties)
        "overrides": [o for o in tiny_overrides(str(root)) if not o.startswith(("storage", "name", "tracking"))] + ["distill.eval_epochs=50"],
        "num_stages": [1, 2],
        "ipc_per_stage": [1, 2],
        "scheduler": "fifo",
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = run_sweep(load_sweep(str(path)), progress=False)
    return root, rows


def test_sweep_2x2_has_trials_under_one_parent_with_stage_runs(swept):
    from mlflow import MlflowClient

    root, rows = swept
    assert sorted((r["num_stages"], r["ipc_per_stage"]) for r in rows) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["error"] is None and r["test_acc"] is not None for r in rows)
    assert (root / "sweep_results.json").is_file()
    best = load_config(str(root / "best_config.yaml"))
    # the best config is the finished trial with the highest validation accuracy (never the test set)
    top = max(r["val_acc"] for r in rows if r["test_acc"] is not None)
    winners = {(r["num_stages"], r["ipc_per_stage"]) for r in rows if r["test_acc"] is not None and r["val_acc"] == top}
    assert (best.distill.num_stages, best.distill.ipc_per_stage) in winners
    assert len(winners) < len(rows)  # the assertion above can fail: not every layout ties for best

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("pdd_ray")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pdd.sweep") == "tiny-sweep"]
    assert len(parents) == 1
    pid = parents[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    assert len(trials) == 4
    for trial in trials:
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert len(stages) == int(trial.data.tags["pdd.num_stages"])
    assert "sweep_results.md" in [a.path for a in client.list_artifacts(pid)]


def test_ui_serves_the_runs_page_and_stops_on_ctrl_c(swept):
    root, _ = swept
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdd_ray", "ui", str(root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server answers /health
        assert f"http://127.0.0.1:{port}/#/experiments/" in line and line.rstrip().endswith("(Ctrl-C to stop)")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        assert len(_runs(f"http://127.0.0.1:{port}", "pdd_ray")) >= 5
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3)


def test_ui_without_a_store_is_a_one_line_error(tmp_path):
    from pdd_ray.ui import find_store

    with pytest.raises(PddError, match="no MLflow store"):
        find_store(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# issue 16: the UI as a user meets it
# ----------------------------------------------------------------------------------------------


def _tracker_store(tmp_path, monkeypatch, tiny_overrides):
    """A RunTracker's default sqlite store, created from an unrelated working directory."""
    from pdd_ray.tracking import RunTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    storage = tmp_path / "store"
    ov = [o for o in tiny_overrides(str(storage)) if not o.startswith("tracking")]
    tracker = RunTracker(load_config("digits", ov + ["tracking.enabled=true"]))
    tracker.finish()
    return storage, elsewhere


def test_store_opens_in_the_training_view_with_a_best_first_runs_view(tmp_path, monkeypatch, tiny_overrides):
    from mlflow import MlflowClient

    from pdd_ray.tracking import EXPERIMENT_KIND_TAG, RUNS_VIEW_KEY, SHARED_VIEW_TAG_PREFIX

    storage, elsewhere = _tracker_store(tmp_path, monkeypatch, tiny_overrides)
    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("pdd_ray")
    # the experiment kind MLflow's UI itself writes for "Machine learning" (not GenAI)
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # the saved runs view: final test accuracy, IPC, stages and method, best run first
    envelope = json.loads(exp.tags[SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`final_test_acc`" and state["orderByAsc"] is False
    assert {"metrics.`final_test_acc`", "tags.`pdd.ipc`", "tags.`pdd.num_stages`", "tags.`pdd.method`"} <= set(
        state["selectedColumns"])
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.tags["pdd.ipc"] == "2" and run.data.tags["pdd.method"] == "mtt"
    # issue 16.6: the "Default" experiment keeps artifacts under the storage root, not the cwd
    default = client.get_experiment("0")
    assert default.artifact_location.removeprefix("file://").startswith(str(storage / "mlartifacts"))
    assert not (elsewhere / "mlruns").exists()
    # a second tracker leaves a user's own choice of kind alone
    client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    _tracker_store(tmp_path, monkeypatch, tiny_overrides)
    assert client.get_experiment(exp.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_accuracy_figure_has_integer_stage_ticks_and_says_when_full_data_trained_less():
    import numpy as np
    from types import SimpleNamespace

    from pdd_ray.tracking import accuracy_figure

    res = SimpleNamespace(mean=lambda: np.array([0.5, 0.6, 0.7]), std=lambda: np.array([0.01, 0.02, 0.01]))
    report = SimpleNamespace(pdd={"convnet": res}, random=SimpleNamespace(final=(55.0, 1.0), name="random ipc 3"),
                             full=SimpleNamespace(final=(60.0, 1.0)))
    fig = accuracy_figure(report, full_epochs=1, pdd_epochs=15)
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "full data (only 1 epoch, PDD 15)" in labels
    fig = accuracy_figure(report, full_epochs=30, pdd_epochs=15)
    assert "full data" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _port_free(port: int) -> bool:
    """Nobody listens on ``port`` and a new server could bind it (SO_REUSEADDR, as servers do:
    connections the old server closed may linger in TIME_WAIT)."""
    import socket

    with socket.socket() as c:
        c.settimeout(5)
        if c.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_overrides):
    """An MLflow store with one tracked (empty) run, made without Ray."""
    from pdd_ray.tracking import RunTracker

    storage = tmp_path_factory.mktemp("uistore")
    ov = [o for o in tiny_overrides(str(storage)) if not o.startswith("tracking")]
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        RunTracker(load_config("digits", ov + ["tracking.enabled=true"])).finish()
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
    return storage


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_ui_stops_the_whole_server_on_sigterm_sigint_sighup(small_store, sig):
    from pdd_ray.ui import group_alive

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdd_ray", "ui", str(small_store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        line = proc.stdout.readline()  # printed (and flushed, into a pipe) once the server answers
        if not line:
            proc.wait(timeout=60)
            pytest.fail(f"pdd-ray ui exited {proc.returncode} without a URL: {proc.stderr.read()[-500:]}")
        assert "#/experiments/" in line and "workflowType=machine_learning" in line, line
        assert "viewStateShareKey=pdd_ray-best-first" in line
        servers = _children(proc.pid)
        assert len(servers) == 1
        server = servers[0]  # leads its own process group: mlflow server and its uvicorn worker
        assert len(group_alive(server)) >= 1 and not _port_free(port)
        print(f"URL after {time.time() - t0:.1f} s")
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert group_alive(server) == []  # nothing of the server is left (no re-parented worker)
    assert _port_free(port)
