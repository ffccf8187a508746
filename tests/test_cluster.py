"""Running pdd_ray on a Ray cluster: the launcher and KubeRay files, and `pdd-ray submit`
end to end against a private local head with token authentication on.

The head is this module's own (``ray start`` in a temp dir, every port chosen here, bound
to 127.0.0.1, token in a temp file): other Ray instances on the machine and the user's
``~/.ray/auth_token`` are never touched, and teardown stops only the processes whose
command line names that temp dir (plus their children), never a bare ``ray stop``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pdd_ray import jobs
from pdd_ray.errors import PddError

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Cluster definitions
# ----------------------------------------------------------------------------------------------


def test_cluster_yaml_matches_ray_schema() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # jsonschema comes with ray[default]
    validate_config(config)  # the launcher's cross-field rules (head type exists, min <= max)
    validate_config(prepare_config(config))  # still valid once merged with the AWS defaults

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert head["resources"].get("GPU", 0) == 0
    assert gpu_types and all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu_types)
    assert "gpu" in config["docker"]["image"]
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted and any("pip install" in c and mounted[0] in c for c in config["setup_commands"])
    assert config["idle_timeout_minutes"] > 0


def test_kuberay_rayjob_has_the_fields_kuberay_requires() -> None:
    job = yaml.safe_load((REPO / "configs" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("pdd-ray run ")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head_image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert head_image
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and isinstance(group["replicas"], int)
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head_image
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def test_address_and_entrypoint_helpers() -> None:
    assert jobs.normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    for bad in ("http://", "ray://head:10001", "http://head:port", "head name:8265"):
        with pytest.raises(PddError, match="address"):
            jobs.normalize_address(bad)
    assert jobs.build_entrypoint("digits", ["name=a b"]) == "python -m pdd_ray run digits 'name=a b' --no-progress"
    assert jobs.storage_warning("s3://bucket/x", "http://10.0.0.1:8265") is None
    assert jobs.storage_warning("outputs/x", "http://127.0.0.1:8265") is None
    for local in ("outputs/x", "/home/me/out"):
        warning = jobs.storage_warning(local, "http://10.0.0.1:8265")
        assert warning and "\n" not in warning and "s3://" in warning


def test_token_lookup_follows_rays_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert jobs.find_token()[0] == "home"
    (tmp_path / "tok").write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.find_token()[0] == "file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert jobs.find_token()[0] == "env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(PddError, match="RAY_AUTH_TOKEN_PATH"):
        jobs.find_token()


def test_config_file_outside_the_upload_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "my.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(PddError, match="outside the uploaded working directory"):
        jobs.config_for_job(str(outside), REPO)
    assert jobs.config_for_job(str(REPO / "configs" / "digits.yaml"), REPO) == "configs/digits.yaml"
    assert jobs.config_for_job("digits", REPO) == "digits"


# ----------------------------------------------------------------------------------------------
# A private head
# ----------------------------------------------------------------------------------------------


@dataclass
class Head:
    address: str
    temp_dir: Path
    token_path: Path


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_own_ray(temp_dir: Path) -> None:
    """Stop the processes of *this* head only: those naming its temp dir, and their children."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    tag = str(temp_dir)
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if tag in " ".join(p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """``ray start --head`` with token auth, private ports and temp dir; stopped by PID."""
    temp_dir = Path(tempfile.mkdtemp(prefix="pdr", dir="/tmp"))  # short: socket paths have a limit
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    (gcs, dashboard, client, node_mgr, obj_mgr, metrics, agent_grpc, agent_http, env_agent) = _free_ports(9)
    worker_base = random.randrange(20000, 32000, 200)  # below Linux's ephemeral range, above Ray's default
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),  # never ~/.ray/auth_token: that one is the user's
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # jobs' `python` = this venv
    )
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_bin), "start", "--head",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr), "--metrics-export-port", str(metrics),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--dashboard-agent-listen-port", str(agent_http),
        "--runtime-env-agent-port", str(env_agent),
        "--min-worker-port", str(worker_base), "--max-worker-port", str(worker_base + 199),
        "--temp-dir", str(temp_dir), "--num-cpus", "2", "--object-store-memory", str(200 * 1024**2),
        "--disable-usage-stats",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}): {proc.stderr[-2000:]}")
        yield Head(f"http://127.0.0.1:{dashboard}", temp_dir, token_path)
    finally:
        _stop_own_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def client_env(head: Head, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Head:
    """The submitting side: finds the head's token through RAY_AUTH_TOKEN_PATH only."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the user's ~/.ray/auth_token stays out of it
    return head


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``pdd-ray ARGV`` in-process through the real ``cli.main`` (error printing, exit codes)."""
    from pdd_ray import cli

    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pdd-ray: error:")]


def test_submit_runs_tiny_digits_on_the_cluster(client_env: Head, tmp_path: Path, capsys, tiny_overrides) -> None:
    storage = tmp_path / "storage"
    overrides = [o for o in tiny_overrides(str(storage)) if not o.startswith("tracking")]  # tracked in MLflow
    rc, out, err = _cli(["submit", "digits", *overrides, "--address", client_env.address], capsys)
    assert rc == 0, err[-3000:]
    assert "submitted job raysubmit_" in out and "SUCCEEDED" in out
    assert "PDD stage 2" in out  # the job's own table, streamed back
    manifests = list(storage.glob("runs/*/artifact/manifest.json"))
    assert len(manifests) == 1, sorted(str(p) for p in storage.rglob("*"))[:50]
    assert json.loads(manifests[0].read_text())["stages"]
    # the job's runs are in the MLflow store under the same storage root, tagged with the job id
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pdd_ray").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags.get("ray.job_id", "").startswith("raysubmit_")
    assert len(runs) == 3  # the run and its two stages


def test_failed_job_exits_1_with_one_line(client_env: Head, tmp_path: Path, capsys, tiny_overrides) -> None:
    # Valid config here, fails there: the dataset root does not exist on the cluster.
    argv = ["submit", "digits", *tiny_overrides(str(tmp_path / "s")), "data.dataset=mnist",
            "data.root=/nonexistent/pdd", "--address", client_env.address]  # fmt: skip
    rc, out, err = _cli(argv, capsys)
    assert rc == 1
    (line,) = _error_lines(err)
    job_id = out.split("submitted job ", 1)[1].split()[0]
    assert f"job {job_id} FAILED" in line and "no data under /nonexistent/pdd" in line

    rc, out, _ = _cli(["jobs", "status", job_id, "--address", client_env.address], capsys)
    assert rc == 0 and out.startswith(f"{job_id} FAILED")
    rc, out, _ = _cli(["jobs", "logs", job_id, "--address", client_env.address], capsys)
    assert rc == 0 and "pdd-ray: error: dataset 'mnist'" in out
    rc, out, _ = _cli(["jobs", "stop", job_id, "--address", client_env.address], capsys)
    assert rc == 0 and "already finished" in out
    rc, _, err = _cli(["jobs", "status", "raysubmit_nosuchjob", "--address", client_env.address], capsys)
    assert rc == 2 and _error_lines(err) == [err.strip()] and "no job 'raysubmit_nosuchjob'" in err


def test_missing_or_wrong_token_is_one_line(client_env: Head, monkeypatch, capsys) -> None:
    argv = ["submit", "digits", "storage=/tmp/unused", "--no-wait", "--address", client_env.address]
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and _error_lines(err) == [err.strip()]
    assert "requires an auth token" in err and "RAY_AUTH_TOKEN" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and _error_lines(err) == [err.strip()] and "rejected the auth token" in err


def test_bad_address_is_one_line(client_env: Head, capsys) -> None:
    (closed,) = _free_ports(1)
    for address, expected in ((f"http://127.0.0.1:{closed}", "no Ray dashboard answers"),
                              ("http://127.0.0.1:port", "malformed")):  # fmt: skip
        rc, _, err = _cli(["submit", "digits", "--no-wait", "--address", address], capsys)
        assert rc == 2 and _error_lines(err) == [err.strip()] and expected in err
