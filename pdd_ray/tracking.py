"""MLflow tracking: run -> stage runs (and sweep -> trial -> stage), metrics, images, lineage.

Everything goes through an explicit ``MlflowClient`` (no fluent global run stack), so the same
code works in the driver and in a Tune trial process (stage workers never log: the driver
feeds their records into a :class:`StageLogger`, see ``pdd_ray.distill.stage_progress``). The
default store is ``sqlite:///<storage>/mlflow.db`` (MLflow 3 refuses new file stores);
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point at a server instead (needed on clusters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdd_ray import __version__
from pdd_ray.config import PddConfig, dump_config
from pdd_ray.mlflow_store import ensure_store
from pdd_ray.storage import Folder, is_remote

PARENT_TAG = "mlflow.parentRunId"


#: Where the MLflow store goes when ``storage`` is an object store and no tracking URI is given.
REMOTE_STORAGE_TRACKING_DIR = "~/.pdd_ray"


def tracking_uri(cfg: PddConfig) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > ``sqlite:///<storage>/mlflow.db``.

    MLflow's SQLite store needs a local file: with ``storage`` in an object store it goes to
    ``~/.pdd_ray/mlflow.db`` on the driver's machine (said once on stderr); a team sets
    ``tracking.uri`` to a server instead.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:
        return uri
    root = cfg.storage_root.removeprefix("file://")
    if is_remote(root):
        root = str(Path(REMOTE_STORAGE_TRACKING_DIR).expanduser())
        print(f"pdd-ray: storage {cfg.storage_root} is an object store, so MLflow tracks this run in "
              f"{root}/mlflow.db on this machine (`pdd-ray ui {root}`); set tracking.uri to share a server",
              file=sys.stderr, flush=True)
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


#: Entries per ``log_batch`` call: MLflow accepts at most 1000 metrics and 100 params in one.
METRICS_PER_BATCH = 900
PARAMS_PER_BATCH = 100


def log_batches(client, run_id: str, metrics: list | None = None, params: list | None = None) -> None:
    """``client.log_batch`` in as many calls as MLflow's per-call limits need (none for nothing)."""
    metrics, params = metrics or [], params or []
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])


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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # MLflow's ExperimentKind for model training ("Machine learning")
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow 3 UI: saved views of the runs page
RUNS_VIEW_KEY = "pdd_ray-best-first"
RUNS_VIEW_NAME = "pdd_ray: best run first"


def runs_view_state() -> dict:
    """The runs page's first screen for pdd_ray: "which run is best".

    MLflow 3.17's runs table shows only Source, Models and Dataset until a user picks columns,
    and keeps that choice in the browser's local storage. What it does read from the store is a
    *saved view*: an experiment tag ``mlflow.sharedViewState.<key>`` whose state is opened by
    ``#/experiments/<id>/runs?viewStateShareKey=<key>`` (what ``pdd-ray ui`` prints) and is
    listed under "Views" for every user. Its keys are the UI's own (search facets and UI state).
    """
    cols = ["metrics.`final_test_acc`", "tags.`pdd.ipc`", "tags.`pdd.num_stages`", "tags.`pdd.method`",
            "attributes.`Dataset`"]
    return {"searchFilter": "", "orderByKey": "metrics.`final_test_acc`", "orderByAsc": False,
            "selectedColumns": cols, "columnOrder": cols}


def mark_training_experiment(client, experiment_id: str) -> None:
    """Tag the experiment as model training and give it pdd_ray's saved runs view.

    ``mlflow.experimentKind = custom_model_development`` is the kind MLflow's UI writes when a
    user picks "Machine learning" (left alone when someone set a kind already). MLflow 3.17
    decides GenAI vs training view from its sidebar switch (``?workflowType=`` in the URL, else
    the browser's last choice), so ``pdd-ray ui`` also puts ``workflowType=machine_learning``
    into the URL it prints.
    """
    exp = client.get_experiment(experiment_id)
    tags = exp.tags or {}
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    view_tag = SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY
    if view_tag not in tags:
        now = int(time.time() * 1000)
        envelope = {"name": RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(runs_view_state())}
        client.set_experiment_tag(experiment_id, view_tag, json.dumps(envelope))


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
    """Where and how a stage's metrics and images are logged: its run and the data's space."""

    uri: str
    run_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: Any
    num_classes: int


class StageLogger:
    """A stage's per-iteration metrics (batched) and the image grid at each evaluation, logged
    on the driver (a :class:`pdd_ray.distill.stage_progress.StageSink`)."""

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
        from pdd_ray.image_grid import grid_array, to_pixels

        t = self.target
        grid = grid_array(to_pixels(images, t.mean, t.std, t.zca), labels, t.num_classes)
        self.client.log_image(t.run_id, grid, key="synthetic_images", step=step)

    def flush(self) -> None:
        log_batches(self.client, self.target.run_id, metrics=self.pending)
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
        artifacts = artifact_location(self.cfg, self.uri)
        ensure_store(self.uri, artifacts)  # created once, under a lock; Default's artifacts under storage
        self.client = _client(self.uri)
        self.experiment_id = experiment_id(self.client, self.cfg.tracking.experiment, artifacts)
        mark_training_experiment(self.client, self.experiment_id)
        tags = {**standard_tags(), **self.extra_tags, "pdd.dataset": self.cfg.data.dataset,
                "pdd.num_stages": str(self.cfg.distill.num_stages),
                "pdd.ipc_per_stage": str(self.cfg.distill.ipc_per_stage),
                "pdd.ipc": str(self.cfg.distill.total_ipc), "pdd.method": self.cfg.distill.method}
        if self.parent_id:
            tags[PARENT_TAG] = self.parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_name or self.cfg.name)
        self.run_id = run.info.run_id
        self.stage_ids: dict[int, str] = {}
        self.stage_expert_keys: dict[int, str] = {}
        closed = claim_run(self.client, self.experiment_id, self.run_id, resume_key(self.cfg, self.extra_tags))
        if closed:
            print(f"pdd-ray: marked {len(closed)} MLflow run(s) left RUNNING by a killed earlier run as KILLED",
                  file=sys.stderr)
        self._log_params()

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(self.cfg.to_flat_dict().items())]
        log_batches(self.client, self.run_id, params=params)
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

    def _log_stage_experts(self, key: str, stage: int) -> None:
        """Lineage: the expert trajectory set (store key) a stage matched."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_numpy(np.zeros((1, 1), dtype=np.float32), source=f"pdd_ray-experts://{key}",
                                        name=f"experts-stage{stage}", digest=key)
        ctx = [InputTag("mlflow.data.context", f"experts-stage{stage}")]
        self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(), ctx)])
        self.stage_expert_keys[stage] = key

    def on_experts(self, key: str, summaries: list[dict]) -> None:
        """Per-expert final accuracy (step = expert index) and the store key they live under."""
        from mlflow.entities import Metric

        self.client.set_tag(self.run_id, "pdd.experts_key", key)
        now = int(time.time() * 1000)
        metrics = []
        for s in summaries:
            metrics.append(Metric("expert_final_val_acc", s["final_val_acc"], now, s["index"]))
            metrics.append(Metric("expert_final_train_acc", s["final_train_acc"], now, s["index"]))
        log_batches(self.client, self.run_id, metrics=metrics)

    def on_real_examples(self, k: int, n: int) -> None:
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

    def on_stage_start(self, k: int, prepared, experts_key: str | None) -> StageLogger:
        """Stage k's child run (and the experts it matches, as lineage), with the logger the
        driver feeds rank 0's records into."""
        logger = StageLogger(self.stage_target(k, prepared))
        if experts_key is not None:
            self._log_stage_experts(experts_key, k)
        return logger

    def _log_stage_health(self, health) -> None:
        """Flags of a stage that kept its initialisation or diverged (``pdd_ray.distill.health``):
        tags on the stage run, its final validation accuracy, and the warning on the run itself."""
        from mlflow.entities import Metric, RunTag

        k = health.stage
        flags = [RunTag("pdd.kept_initialisation", str(health.kept_initialisation).lower()),
                 RunTag("pdd.validation_collapsed", str(health.validation_collapsed).lower())]
        now = int(time.time() * 1000)
        self.client.log_batch(self.stage_ids[k], tags=flags,
                              metrics=[Metric("stage_final_val_acc", health.final_val_acc, now, 0)])
        if health.warning:
            self.client.set_tag(self.run_id, f"pdd.warning.stage{k}", health.warning[:5000])

    def on_stage_end(self, k: int, outcome, seconds: float, resumed_from_record: bool, health) -> None:
        """After stage k: its health flags, summary metrics (and its histories when it was not
        run now)."""
        from mlflow.entities import Metric

        self._log_stage_health(health)
        run_id = self.stage_ids[k]
        now = int(time.time() * 1000)
        metrics = [Metric("stage_alpha", outcome.alpha, now, 0), Metric("stage_best_val_acc", outcome.best_val_acc, now, 0),
                   Metric("stage_seconds", seconds, now, 0)]
        if resumed_from_record:
            metrics += [Metric("loss", v, now, i + 1) for i, v in enumerate(outcome.losses)]
            metrics += [Metric("val_acc", a, now, it) for it, a in outcome.val_history]
        log_batches(self.client, run_id, metrics=metrics)
        self.log_stage_params(k, outcome)
        self.client.log_batch(self.run_id, metrics=[Metric("stage_best_val_acc", outcome.best_val_acc, now, k),
                                                    Metric("stage_seconds", seconds, now, k)])
        self.client.set_terminated(run_id, "FINISHED")

    def log_stage_params(self, k: int, outcome) -> None:
        """Stage k's own settings as params of its run, so stages (and trials' stages) can be
        compared side by side: index, images per class of the union S_1..S_k (the stored
        budget), the iteration selection kept, its learned step size alpha_k, and the expert
        store it matched ("none": fresh networks, e.g. DM/IDC at stage 1)."""
        from mlflow.entities import Param

        params = {"stage": k, "union_ipc": k * self.cfg.distill.ipc_per_stage,
                  "selected_iteration": outcome.best_iteration, "alpha": f"{outcome.alpha:.6g}",
                  "experts_key": self.stage_expert_keys.get(k, "none")}
        self.client.log_batch(self.stage_ids[k], params=[Param(f"stage.{n}", str(v)) for n, v in params.items()])

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
        metrics.append(Metric("final_test_acc", float(means[-1]), now, 0))  # the runs table's default column
        if getattr(report, "pdd_hard", None) is not None:  # soft-label controls (DATM)
            for k, v in enumerate(report.pdd_hard.mean()):
                metrics.append(Metric("hard_label_test_acc", float(v), now, k + 1))
        if getattr(report, "random_soft", None) is not None:
            metrics.append(Metric("random_soft_label_test_acc", report.random_soft.final[0] / 100, now, 0))
        metrics += [Metric(f"seconds_{k}", v, now, 0) for k, v in report.seconds.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        pdd_epochs = sum(st.epochs for st in report.distilled.stages)
        self.client.log_figure(self.run_id, accuracy_figure(report, self.cfg.evaluation.full_epochs, pdd_epochs),
                               "accuracy_vs_stage.png")
        self.client.log_figure(self.run_id, loss_figure(report), "matching_loss.png")
        self._log_run_files(report.distilled.artifact, report.distilled.directory / "results.json")
        self.client.log_table(self.run_id, {
            "method": [r[0] for r in report.rows()], "setting": [r[1] for r in report.rows()],
            "mean": [r[2] for r in report.rows()], "std": [r[3] for r in report.rows()]}, "results_table.json")

    def _log_run_files(self, artifact: Folder, results: Folder) -> None:
        """The artifact folder and ``results.json`` as MLflow artifacts (MLflow reads local files:
        from an object store they are fetched into a temporary folder first)."""
        if artifact.local:
            self.client.log_artifacts(self.run_id, str(artifact), "artifact")
            self.client.log_artifact(self.run_id, str(results))
            return
        with tempfile.TemporaryDirectory(prefix="pdd-ray-mlflow-") as tmp:
            (Path(tmp) / "artifact").mkdir()
            for f in artifact.files():
                (Path(tmp) / "artifact" / f.name).write_bytes(f.read_bytes())
            (Path(tmp) / results.name).write_bytes(results.read_bytes())
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "artifact"), "artifact")
            self.client.log_artifact(self.run_id, str(Path(tmp) / results.name))

    def finish(self, status: str = "FINISHED") -> None:
        for run_id in self.stage_ids.values():
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING":
                self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.run_id, status)


# ----------------------------------------------------------------------------------------------
# runs left RUNNING by a killed process
# ----------------------------------------------------------------------------------------------

RESUME_TAG = "pdd.resume_key"
OWNER_TAG = "pdd.owner"


@contextmanager
def closed_on_error(tracker: RunTracker | None) -> Iterator[None]:
    """Run the body; if it raises (Ctrl-C included), mark ``tracker``'s runs KILLED (on
    KeyboardInterrupt) or FAILED before the error goes on, so no run is left RUNNING."""
    try:
        yield
    except BaseException as err:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


@contextmanager
def tracked(cfg: PddConfig, **run_options: Any) -> Iterator[RunTracker | None]:
    """The work's MLflow run, opened once: yields its :class:`RunTracker` (None with tracking off).

    The one place a tracked command opens and closes its run: FINISHED when the body ends,
    KILLED on Ctrl-C, FAILED on an error (:func:`closed_on_error`), so no run is left RUNNING.
    ``run_options`` go to :class:`RunTracker` (``run_name``, ``parent_id``, ``extra_tags``).
    """
    tracker = RunTracker(cfg, **run_options) if cfg.tracking.enabled else None
    with closed_on_error(tracker):
        yield tracker
    if tracker is not None:
        tracker.finish("FINISHED")


def resume_key(cfg: PddConfig, extra_tags: dict[str, str] | None = None) -> str:
    """What a re-run of the same work shares with the run it resumes: its kind and run key."""
    from pdd_ray.distill.identity import run_key

    tags = extra_tags or {}
    kind = tags.get("pdd.kind") or ("sweep" if "pdd.sweep" in tags else "run")
    return f"{kind}:{run_key(cfg)}"


def _start_ticks(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, Linux): tells a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def owner_tag() -> str:
    """``host:pid:start``: the process that owns a run while it is RUNNING."""
    import socket

    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or '-'}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process named by :func:`owner_tag` still runs; None when it cannot be told
    (another host, or a tag from elsewhere)."""
    import socket

    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return start == "-" or _start_ticks(pid) == start


def claim_run(client, experiment_id: str, run_id: str, key: str) -> list[str]:
    """Tag ``run_id`` with its owner and resume key, and mark ``KILLED`` the runs of the same key
    that a killed process left ``RUNNING`` (their RUNNING descendants too); returns their ids.

    Only runs whose owner is known to be dead (same host, process gone) are touched, so a
    concurrent live run of the same config is left alone.
    """
    client.set_tag(run_id, RESUME_TAG, key)
    client.set_tag(run_id, OWNER_TAG, owner_tag())
    stale = []
    for run in client.search_runs([experiment_id], f"tags.`{RESUME_TAG}` = '{key}' and attributes.status = 'RUNNING'",
                                  max_results=1000):
        if run.info.run_id != run_id and owner_alive(run.data.tags.get(OWNER_TAG, "")) is False:
            stale.append(run.info.run_id)
    closed = []
    while stale:
        rid = stale.pop()
        client.set_terminated(rid, "KILLED")
        closed.append(rid)
        children = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{rid}' and attributes.status = 'RUNNING'",
                                      max_results=1000)
        stale += [c.info.run_id for c in children]
    return closed


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


def accuracy_figure(report, full_epochs: int | None = None, pdd_epochs: int | None = None):
    """Test accuracy after each stage with the random-subset and full-data baselines.

    Stages are counted, so the axis has integer ticks only. When the full-data network trained
    for fewer epochs than PDD's networks (tiny configs), its legend entry says so: the line is
    then no ceiling.
    """
    from matplotlib.ticker import MaxNLocator

    fig, ax = _axes()
    for arch, res in report.pdd.items():
        x = np.arange(1, len(res.mean()) + 1)
        ax.errorbar(x, res.mean() * 100, yerr=res.std() * 100, marker="o", capsize=3, label=f"PDD [{arch}]")
    if report.random is not None:
        ax.axhline(report.random.final[0], color="grey", ls="--", label=f"random ({report.random.name.split()[-1]})")
    if report.full is not None:
        label = "full data"
        if full_epochs is not None and pdd_epochs is not None and full_epochs < pdd_epochs:
            label += f" (only {full_epochs} epoch{'s' if full_epochs != 1 else ''}, PDD {pdd_epochs})"
        ax.axhline(report.full.final[0], color="black", ls=":", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("stage")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    return _done(fig)


def loss_figure(report):
    """Matching loss over iterations, stage after stage."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _axes()
    offset = 0
    for k, out in enumerate(report.distilled.outcomes, start=1):
        x = np.arange(offset + 1, offset + len(out.losses) + 1)
        ax.plot(x, out.losses, label=f"stage {k}")
        offset += len(out.losses)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    ax.legend(fontsize=8)
    return _done(fig)
