"""MLflow tracking: run -> stage runs (and sweep -> trial -> stage), metrics, images, lineage.

Everything goes through an explicit ``MlflowClient`` (no fluent global run stack), so the same
code works in the driver, in a Tune trial process and in Ray Train's rank-0 worker. The
default store is ``sqlite:///<storage>/mlflow.db`` (MLflow 3 refuses new file stores);
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point at a server instead (needed on clusters).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdd_ray import __version__
from pdd_ray.config import PddConfig, dump_config
from pdd_ray.errors import PddError

PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(cfg: PddConfig) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > ``sqlite:///<storage>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:
        return uri
    root = cfg.storage_root.removeprefix("file://")
    if "://" in root:
        raise PddError(f"storage = {cfg.storage_root!r} is remote: set tracking.uri to an MLflow server (http://HOST:5000)")
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def artifact_location(cfg: PddConfig, uri: str) -> str | None:
    """With the default sqlite store, artifacts live beside it (MLflow would use ./mlruns in
    whatever directory the process happens to run); a server decides for itself."""
    if uri.startswith("sqlite:///") and not (os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def experiment_id(client, name: str, artifact_root: str | None = None) -> str:
    """The experiment's id, created on first use (tolerates a concurrent creator)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except Exception:  # noqa: BLE001 - created by a concurrent process in the meantime
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    """The source tree's commit, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def standard_tags() -> dict[str, str]:
    """Version, commit and Ray job id (when submitted as a Ray job)."""
    tags = {"pdd_ray.version": __version__}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    job = ray_job_submission_id()
    if job:
        tags["ray.job_id"] = job
    return tags


def ray_job_submission_id() -> str | None:
    """The submission id (``raysubmit_...``) when this process is a Ray job's entrypoint.

    Ray's job supervisor hands the driver its metadata as JSON in ``RAY_JOB_CONFIG_JSON_ENV_VAR``.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------
# inside the rank-0 Train worker
# ----------------------------------------------------------------------------------------------


@dataclass
class StageLogTarget:
    """Where and how a stage worker logs (picklable: travels in the Train loop config)."""

    uri: str
    run_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: Any
    num_classes: int


class StageLogger:
    """Rank-0 logging of per-iteration metrics (batched) and the image grid at each evaluation."""

    def __init__(self, target: StageLogTarget, flush_every: int = 20) -> None:
        self.target = target
        self.client = _client(target.uri)
        self.pending: list = []
        self.flush_every = flush_every

    def metrics(self, step: int, **values: float) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items() if v == v]
        if len(self.pending) >= self.flush_every * max(1, len(values)):
            self.flush()

    def images(self, step: int, images, labels) -> None:
        from pdd_ray.distill.artifact import grid_array, to_pixels

        t = self.target
        grid = grid_array(to_pixels(images, t.mean, t.std, t.zca), labels, t.num_classes)
        self.client.log_image(t.run_id, grid, key="synthetic_images", step=step)

    def flush(self) -> None:
        for i in range(0, len(self.pending), 900):
            self.client.log_batch(self.target.run_id, metrics=self.pending[i : i + 900])
        self.pending = []


# ----------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------


@dataclass
class RunTracker:
    """One pdd_ray run in MLflow: a run (a sweep's trial when ``parent_id`` is set) with one
    child run per stage."""

    cfg: PddConfig
    parent_id: str | None = None
    run_name: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uri = tracking_uri(self.cfg)
        self.client = _client(self.uri)
        self.experiment_id = experiment_id(self.client, self.cfg.tracking.experiment,
                                           artifact_location(self.cfg, self.uri))
        tags = {**standard_tags(), **self.extra_tags, "pdd.dataset": self.cfg.data.dataset,
                "pdd.num_stages": str(self.cfg.distill.num_stages),
                "pdd.ipc_per_stage": str(self.cfg.distill.ipc_per_stage)}
        if self.parent_id:
            tags[PARENT_TAG] = self.parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_name or self.cfg.name)
        self.run_id = run.info.run_id
        self.stage_ids: dict[int, str] = {}
        self._log_params()

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(self.cfg.to_flat_dict().items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, dump_config(self.cfg), "config.yaml")

    def log_dataset(self, bundle, context: str = "training") -> None:
        """Lineage: the real dataset (name and content digest) this run distills."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # our source scheme is unknown to MLflow's resolver: fine
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_numpy(bundle.train_x[:1].numpy(), targets=bundle.train_y[:1].numpy(),
                                        source=f"pdd_ray://{bundle.name}", name=bundle.name, digest=bundle.digest)
        self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])])

    def log_experts(self, key: str, stage: int) -> None:
        """Lineage: the expert trajectory set (store key) a stage matched."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_numpy(np.zeros((1, 1), dtype=np.float32), source=f"pdd_ray-experts://{key}",
                                        name=f"experts-stage{stage}", digest=key)
        ctx = [InputTag("mlflow.data.context", f"experts-stage{stage}")]
        self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(), ctx)])

    def log_expert_summaries(self, key: str, summaries: list[dict]) -> None:
        """Per-expert final accuracy (step = expert index) and the store key they live under."""
        from mlflow.entities import Metric

        self.client.set_tag(self.run_id, "pdd.experts_key", key)
        now = int(time.time() * 1000)
        metrics = []
        for s in summaries:
            metrics.append(Metric("expert_final_val_acc", s["final_val_acc"], now, s["index"]))
            metrics.append(Metric("expert_final_train_acc", s["final_train_acc"], now, s["index"]))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 900])

    def log_real_examples(self, k: int, n: int) -> None:
        """How many real training examples stage k's experts used (step = stage; forgetting discarding)."""
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric("real_examples", float(n), int(time.time() * 1000), k)])

    def stage_target(self, k: int, prepared) -> StageLogTarget:
        """Create stage k's child run and say how its rank-0 worker should log into it."""
        b = prepared.bundle
        tags = {**standard_tags(), PARENT_TAG: self.run_id, "pdd.stage": str(k)}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{self.run_name or self.cfg.name}/stage{k}")
        self.stage_ids[k] = run.info.run_id
        return StageLogTarget(self.uri, run.info.run_id, b.mean, b.std, prepared.zca, b.num_classes)

    def on_stage(self, k: int, outcome, seconds: float, resumed_from_record: bool) -> None:
        """After stage k: its summary metrics (and its histories when it was not run now)."""
        from mlflow.entities import Metric

        run_id = self.stage_ids[k]
        now = int(time.time() * 1000)
        metrics = [Metric("stage_alpha", outcome.alpha, now, 0), Metric("stage_best_val_acc", outcome.best_val_acc, now, 0),
                   Metric("stage_seconds", seconds, now, 0)]
        if resumed_from_record:
            metrics += [Metric("loss", v, now, i + 1) for i, v in enumerate(outcome.losses)]
            metrics += [Metric("val_acc", a, now, it) for it, a in outcome.val_history]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])
        self.client.log_batch(self.run_id, metrics=[Metric("stage_best_val_acc", outcome.best_val_acc, now, k),
                                                    Metric("stage_seconds", seconds, now, k)])
        self.client.set_terminated(run_id, "FINISHED")

    def on_report(self, report) -> None:
        """Final numbers, figures and artifacts on the run (and test accuracy on each stage run)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        res = report.pdd.get("convnet") or next(iter(report.pdd.values()))
        means, stds = res.mean(), res.std()
        metrics = []
        if report.random is not None:
            metrics.append(Metric("random_test_acc", report.random.final[0] / 100, now, 0))
        if report.full is not None:
            metrics.append(Metric("full_test_acc", report.full.final[0] / 100, now, 0))
        for k in range(len(means)):
            metrics += [Metric("test_acc", float(means[k]), now, k + 1), Metric("test_acc_std", float(stds[k]), now, k + 1)]
            if k + 1 in self.stage_ids:
                self.client.log_batch(self.stage_ids[k + 1], metrics=[Metric("test_acc", float(means[k]), now, 0)])
        for arch, r in report.pdd.items():
            metrics.append(Metric(f"final_test_acc_{arch}", float(r.mean()[-1]), now, 0))
        if getattr(report, "pdd_hard", None) is not None:  # soft-label controls (DATM)
            for k, v in enumerate(report.pdd_hard.mean()):
                metrics.append(Metric("hard_label_test_acc", float(v), now, k + 1))
        if getattr(report, "random_soft", None) is not None:
            metrics.append(Metric("random_soft_label_test_acc", report.random_soft.final[0] / 100, now, 0))
        metrics += [Metric(f"seconds_{k}", v, now, 0) for k, v in report.seconds.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.client.log_figure(self.run_id, accuracy_figure(report), "accuracy_vs_stage.png")
        self.client.log_figure(self.run_id, loss_figure(report), "matching_loss.png")
        self.client.log_artifacts(self.run_id, str(report.distilled.artifact), "artifact")
        self.client.log_artifact(self.run_id, str(report.distilled.directory / "results.json"))
        self.client.log_table(self.run_id, {
            "method": [r[0] for r in report.rows()], "setting": [r[1] for r in report.rows()],
            "mean": [r[2] for r in report.rows()], "std": [r[3] for r in report.rows()]}, "results_table.json")

    def finish(self, status: str = "FINISHED") -> None:
        for run_id in self.stage_ids.values():
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING":
                self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.run_id, status)


def _axes():
    """A small figure on the non-interactive backend (workers and servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 3.5))


def _done(fig):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    plt.close(fig)
    return fig


def accuracy_figure(report):
    """Test accuracy after each stage with the random-subset and full-data baselines."""
    fig, ax = _axes()
    for arch, res in report.pdd.items():
        x = np.arange(1, len(res.mean()) + 1)
        ax.errorbar(x, res.mean() * 100, yerr=res.std() * 100, marker="o", capsize=3, label=f"PDD [{arch}]")
    if report.random is not None:
        ax.axhline(report.random.final[0], color="grey", ls="--", label=f"random ({report.random.name.split()[-1]})")
    if report.full is not None:
        ax.axhline(report.full.final[0], color="black", ls=":", label="full data")
    ax.set_xlabel("stage")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    return _done(fig)


def loss_figure(report):
    """Matching loss over iterations, stage after stage."""
    fig, ax = _axes()
    offset = 0
    for k, out in enumerate(report.distilled.outcomes, start=1):
        x = np.arange(offset + 1, offset + len(out.losses) + 1)
        ax.plot(x, out.losses, label=f"stage {k}")
        offset += len(out.losses)
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    ax.legend(fontsize=8)
    return _done(fig)
