"""``pdd-ray sweep``: Ray Tune over stage counts x images per class (and learning rates).

Ray 2.x (Train V2) pattern: each Tune trial is a plain function that runs the whole PDD
pipeline, whose stages are themselves Ray Train runs. After every stage the trial reports
``{"stage": k, "val_acc": ...}``, and an ASHA scheduler with ``time_attr="stage"`` stops trials
that are behind after stage k. Stage-1 experts are produced once, before any trial starts
(they are shared: the store is content-addressed), so concurrent trials never race for them.

MLflow: the sweep is a parent run, each trial a child, each trial's stages grandchildren.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdd_ray.config import (_format_validation_error, absolute_storage, dump_config, load_config, read_yaml,
                            resolve_preset, split_override)
from pdd_ray.errors import PddError
from pdd_ray.storage import Folder


class SweepConfig(BaseModel):
    """A sweep file (see ``configs/sweep_digits.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "sweep"
    base: str = "digits"
    storage: str = "outputs/sweep"
    overrides: list[str] = []
    mode: Literal["grid", "fixed_total_ipc"] = "grid"
    num_stages: list[int] = Field(default_factory=lambda: [1, 2])
    ipc_per_stage: list[int] = Field(default_factory=lambda: [1, 2])
    total_ipc: int | None = Field(None, ge=1)
    search: dict[str, Any] = {}
    num_samples: int = Field(1, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    reduction_factor: float = Field(2.0, gt=1.0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    trial_cpus: float = Field(0.5, gt=0.0)
    # equal training budget: every trial's evaluation trains this many epochs in all
    # (evaluation.epochs_per_stage = budget_epochs / P); unset: P x epochs_per_stage, shown per row
    budget_epochs: int | None = Field(None, ge=1)


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep file; ``key=value`` overrides apply to the sweep's own keys."""
    data = read_yaml(resolve_preset(path))
    for item in overrides or []:
        k, v = split_override(item, "key=value")
        data[k] = yaml.safe_load(v)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise PddError("sweep " + _format_validation_error(err, data)) from None
    if sweep.mode == "fixed_total_ipc":
        if sweep.total_ipc is None:
            raise PddError("sweep mode fixed_total_ipc needs total_ipc (e.g. total_ipc: 10)")
        bad = [p for p in sweep.num_stages if sweep.total_ipc % p]
        if bad:
            raise PddError(f"sweep num_stages {bad} do not divide total_ipc = {sweep.total_ipc}; pick divisors")
    if sweep.budget_epochs is not None:
        bad = [p for p in sweep.num_stages if sweep.budget_epochs % p]
        if bad:
            raise PddError(f"sweep num_stages {bad} do not divide budget_epochs = {sweep.budget_epochs}; pick a "
                           "common multiple")
    return sweep


def _space_entry(spec: Any):
    """YAML search entry -> Tune domain: list = grid, {loguniform|uniform: [a, b]}, {choice: [...]}."""
    from ray import tune

    if isinstance(spec, list):
        return tune.grid_search(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, args), = spec.items()
        if kind == "loguniform":
            return tune.loguniform(*args)
        if kind == "uniform":
            return tune.uniform(*args)
        if kind == "choice":
            return tune.choice(args)
    raise PddError(f"sweep search entry {spec!r} is not a list, {{loguniform: [a, b]}}, {{uniform: [a, b]}} or {{choice: [...]}}")


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune search space; stage layouts are one grid axis so fixed-total mode stays paired."""
    from ray import tune

    if sweep.mode == "fixed_total_ipc":
        layouts = [(p, sweep.total_ipc // p) for p in sweep.num_stages]
    else:
        layouts = list(itertools.product(sweep.num_stages, sweep.ipc_per_stage))
    space = {"layout": tune.grid_search([list(x) for x in layouts])}
    space.update({k: _space_entry(v) for k, v in sweep.search.items()})
    return space


def trial_overrides(sweep: SweepConfig, sampled: dict[str, Any]) -> list[str]:
    """The pdd_ray overrides of one trial: the sweep's, its layout, and its sampled values."""
    p, ipc = sampled["layout"]
    out = [*sweep.overrides, f"storage={absolute_storage(sweep.storage)}", f"distill.num_stages={p}",
           f"distill.ipc_per_stage={ipc}", f"name={sweep.name}-P{p}-ipc{ipc}"]
    if sweep.budget_epochs is not None:  # equal training budget across layouts
        out.append(f"evaluation.epochs_per_stage={sweep.budget_epochs // p}")
    out += [f"{k}={json.dumps(v)}" for k, v in sampled.items() if k not in ("layout", "_parent", "_base")]
    return out


def _trial(sampled: dict[str, Any]) -> None:
    """One Tune trial: the full pipeline, reporting after every stage."""
    from ray import tune

    from pdd_ray.pipeline import run

    sweep = SweepConfig.model_validate(sampled["_sweep"])
    cfg = load_config(sweep.base, trial_overrides(sweep, {k: v for k, v in sampled.items() if k != "_sweep"}))
    last = {"val_acc": 0.0}

    def on_stage(k: int, outcome) -> None:
        last["val_acc"] = outcome.best_val_acc
        if k < cfg.distill.num_stages:
            tune.report({"stage": k, "val_acc": outcome.best_val_acc})

    report = run(cfg, progress=False, parent_run_id=sampled.get("_parent"), run_name=cfg.name, on_stage=on_stage,
                 baselines=False)
    mean, std = report.pdd["convnet"].final if "convnet" in report.pdd else next(iter(report.pdd.values())).final
    tune.report({"stage": cfg.distill.num_stages, "val_acc": last["val_acc"], "test_acc": mean / 100,
                 "test_acc_std": std / 100, "total_ipc": cfg.distill.total_ipc})


def run_sweep(sweep: SweepConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run the sweep; returns one row per trial (also printed, logged and saved)."""
    from pdd_ray.experts.produce import stage1_experts
    from pdd_ray.prepare import prepare
    from pdd_ray.runtime import ensure_ray, ensure_storage

    storage = Folder.at(absolute_storage(sweep.storage))
    base_cfg = load_config(sweep.base, [*sweep.overrides, f"storage={storage}"])
    ensure_storage(base_cfg)
    ensure_ray()
    # shared stage-1 experts first: every layout of this sweep uses the same expert settings
    stage1_experts(base_cfg, prepare(base_cfg), progress=progress)

    from pdd_ray.tracking import tracked

    with tracked(base_cfg, run_name=sweep.name, extra_tags={"pdd.sweep": sweep.name}) as parent:
        rows = _tune(sweep, base_cfg, storage, parent, progress)
        _finish(sweep, storage, rows, parent)
    return rows


def _tune(sweep: SweepConfig, base_cfg, storage: Folder, parent, progress: bool) -> list[dict[str, Any]]:
    """The Tune run of every layout (a child MLflow run of ``parent`` each); one row per trial."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    d = base_cfg.distill
    per_trial_cpus = d.num_workers * d.cpus_per_worker
    concurrency = sweep.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial_cpus))
    max_stages = max(sweep.num_stages)
    scheduler = (ASHAScheduler(time_attr="stage", max_t=max_stages, grace_period=1,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" and max_stages > 1 else FIFOScheduler())
    space = param_space(sweep)
    space["_sweep"] = sweep.model_dump(mode="json")
    if parent is not None:
        space["_parent"] = parent.run_id
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": sweep.trial_cpus}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                    num_samples=sweep.num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=sweep.name, storage_path=(storage / "tune").path,
                                  storage_filesystem=None if storage.local else storage.fs, verbose=1 if progress else 0),
    )
    grid = tuner.fit()
    rows = []
    for res in grid:
        cfg = res.config or {}
        p, ipc = cfg.get("layout", (None, None))
        m = res.metrics or {}
        epochs = (load_config(sweep.base, trial_overrides(sweep, {"layout": [p, ipc]})).evaluation.epochs_per_stage * p
                  if p else None)
        rows.append({"num_stages": p, "ipc_per_stage": ipc, "total_ipc": (p or 0) * (ipc or 0), "epochs": epochs,
                     **{k: v for k, v in cfg.items() if not k.startswith("_") and k != "layout"},
                     "stages_done": m.get("stage"), "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"),
                     "error": str(res.error).splitlines()[0] if res.error else None})
    rows.sort(key=lambda r: -(r["val_acc"] or -1))
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    """One line per trial, best validation first; stopped trials show the stage they reached."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    header = ("stages", "ipc/stage", "total ipc", "train epochs", "stages done", "val acc %", "test acc %")
    body = [(str(r["num_stages"]), str(r["ipc_per_stage"]), str(r["total_ipc"]), str(r.get("epochs")), str(r["stages_done"]),
             pct(r["val_acc"]), pct(r["test_acc"]) if not r["error"] else "error") for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    fmt = " | ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), "-+-".join("-" * w for w in widths), *(fmt.format(*b) for b in body)])


def _finish(sweep: SweepConfig, storage: Folder, rows: list[dict[str, Any]], parent) -> None:
    """Print the table, save it and the best config, and log both to the sweep's parent run."""
    table = results_table(rows)
    print(table)
    (storage / "sweep_results.json").write_text(json.dumps(rows, indent=2, default=str))
    best = next((r for r in rows if r["test_acc"] is not None), None)
    if best is not None:
        sampled = {"layout": [best["num_stages"], best["ipc_per_stage"]],
                   **{k: v for k, v in best.items() if "." in k}}
        cfg = load_config(sweep.base, trial_overrides(sweep, sampled))
        (storage / "best_config.yaml").write_text(dump_config(cfg))
        print(f"best config: {storage / 'best_config.yaml'}")
    if parent is not None:
        cols = ["num_stages", "ipc_per_stage", "total_ipc", "stages_done", "val_acc", "test_acc"]
        parent.client.log_table(parent.run_id, {c: [r[c] for r in rows] for c in cols}, "sweep_results.json")
        parent.client.log_text(parent.run_id, table, "sweep_results.md")
        if best is not None:
            parent.client.log_text(parent.run_id, (storage / "best_config.yaml").read_text(), "best_config.yaml")
