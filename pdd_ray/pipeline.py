"""The main job, end to end: config -> data -> experts -> stages -> evaluation -> results.

Thin on purpose: every step lives in its own module; this one only sequences them and
writes ``results.json`` beside the artifact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

from pdd_ray.config import EvalConfig, PddConfig
from pdd_ray.distill.driver import DistillResult, distill
from pdd_ray.distill.identity import run_lock
from pdd_ray.evaluation import (
    BaselineSetup,
    EvalPlan,
    EvalResult,
    PendingEval,
    RunResources,
    budget_epochs,
    eval_sets_of,
    format_table,
    recipe_from_config,
    submit_full_baseline,
    submit_progressive,
    submit_random_baseline,
)
from pdd_ray.prepare import Prepared, prepare
from pdd_ray.progress import phase
from pdd_ray.runtime import ensure_ray, ensure_storage
from pdd_ray.storage import Folder


@dataclass
class RunReport:
    """Everything `pdd-ray run` prints and saves."""

    distilled: DistillResult
    pdd: dict[str, EvalResult]  # arch -> per-stage result
    random: EvalResult | None  # None when baselines were skipped (sweep trials)
    full: EvalResult | None
    seconds: dict[str, float] = field(default_factory=dict)
    budget_epochs: int | None = None  # evaluation epochs every distilled/random row trains (equal budget)
    # soft-label controls (DATM; README "Honest reporting"): the same images with hard labels,
    # and the random subset with the same expert's soft labels
    pdd_hard: EvalResult | None = None
    random_soft: EvalResult | None = None

    def rows(self) -> list[tuple[str, str, float, float]]:
        """Table rows: random subset, PDD after each stage (per arch), full data."""
        rows = []
        if self.random is not None:
            rows.append(("random subset", f"ipc {self.random.name.removeprefix('random ipc')}", *self.random.final))
        if self.random_soft is not None:
            rows.append(("random subset, soft labels", f"ipc {self.distilled_total_ipc()}", *self.random_soft.final))
        n_classes = max(1, len(set(self.distilled.stages[0].labels.tolist())))
        stored = self.distilled.outcomes[0].images.shape[0] // n_classes  # the budget (IDC stores fewer)
        decoded = self.distilled.stages[0].images.shape[0] // n_classes  # what networks train on
        for arch, res in self.pdd.items():
            means, stds = res.mean() * 100, res.std() * 100
            health = self.distilled.health
            for k in range(len(means)):
                setting = f"ipc {stored * (k + 1)}" + (f" ({decoded * (k + 1)} decoded)" if decoded != stored else "")
                mark = health[k].mark if k < len(health) else ""  # a diverged stage is not PDD: say so
                rows.append((f"PDD stage {k + 1}" + ("" if arch == "convnet" else f" [{arch}]")
                             + (f" ({mark})" if mark else ""), setting, float(means[k]), float(stds[k])))
        if self.pdd_hard is not None:
            means, stds = self.pdd_hard.mean() * 100, self.pdd_hard.std() * 100
            for k in range(len(means)):
                rows.append((f"PDD stage {k + 1}, hard labels", f"ipc {stored * (k + 1)}", float(means[k]), float(stds[k])))
        if self.full is not None:
            rows.append(("full data", "all images", *self.full.final))
        return rows

    def _health_flags(self, k: int) -> dict:
        """Stage k's divergence flags for results.json (kept_initialisation, validation_collapsed, ...)."""
        if k >= len(self.distilled.health):
            return {}
        return {key: v for key, v in self.distilled.health[k].to_dict().items()
                if key not in ("stage", "best_iteration", "best_val_acc")}

    def distilled_total_ipc(self) -> int:
        """Stored images per class of the whole union."""
        n_classes = max(1, len(set(self.distilled.stages[0].labels.tolist())))
        return sum(o.images.shape[0] for o in self.distilled.outcomes) // n_classes

    def to_dict(self) -> dict:
        return {
            "run_dir": str(self.distilled.directory),
            "artifact": str(self.distilled.artifact),
            "stages": [
                {"stage": k + 1, "alpha": o.alpha, "best_val_acc": o.best_val_acc, "best_iteration": o.best_iteration,
                 **self._health_flags(k)}
                for k, o in enumerate(self.distilled.outcomes)
            ],
            "pdd": {a: r.to_dict() for a, r in self.pdd.items()},
            "random": self.random.to_dict() if self.random is not None else None,
            "full": self.full.to_dict() if self.full is not None else None,
            "pdd_hard_labels": self.pdd_hard.to_dict() if self.pdd_hard is not None else None,
            "random_soft_labels": self.random_soft.to_dict() if self.random_soft is not None else None,
            "seconds": self.seconds,
            "budget_epochs": self.budget_epochs,
            "table": [{"method": m, "setting": s, "mean": mu, "std": sd} for m, s, mu, sd in self.rows()],
        }


def evaluate_distilled(cfg: PddConfig, prepared: Prepared, result: DistillResult, progress: bool) -> dict[str, EvalResult]:
    """Progressive evaluation of the distilled stages on every configured architecture."""
    return {arch: pending.result() for arch, pending in submit_distilled(cfg, prepared, result, progress).items()}


def submit_distilled(cfg: PddConfig, prepared: Prepared, result: DistillResult, progress: bool) -> dict[str, PendingEval]:
    """:func:`evaluate_distilled`'s runs, submitted (one :class:`PendingEval` per architecture)."""
    recipe = recipe_from_config(cfg.evaluation, cfg.augment.strategy)
    return {
        arch: submit_progressive(
            "PDD",
            prepared.spec.with_arch(arch),
            result.stages,
            EvalPlan(recipe, cfg.evaluation.runs, cfg.seed, cfg.evaluation.carry_optimizer_state),
            eval_sets_of(prepared.bundle),
            RunResources.of(cfg.evaluation),
            progress=progress,
        )
        for arch in cfg.evaluation.archs
    }


def stage1_labeller(cfg: PddConfig, prepared: Prepared, result: DistillResult):
    """``x -> logits`` of the expert that labelled stage 1 (the first stage-1 expert at
    ``datm.label_epoch``, default its last recorded epoch): the soft labels of the random control."""
    from pdd_ray.experts.produce import expert_store_root
    from pdd_ray.experts.store import TrajectoryStore
    from pdd_ray.soft_labels import expert_logits, labeller_params

    key = result.expert_keys[0]
    index = TrajectoryStore(expert_store_root(cfg)).indices(key)[0]
    theta, _ = labeller_params(expert_store_root(cfg), key, index, cfg.datm.label_epoch)
    return lambda x: expert_logits(prepared.spec, theta, x)


def soft_label_controls(cfg: PddConfig, prepared: Prepared, result: DistillResult, progress: bool,
                        ev: EvalConfig | None = None) -> tuple[EvalResult | None, EvalResult | None]:
    """Soft labels inflate accuracy even for random real images (DD-Ranking's point), so a
    soft-label set is reported beside two controls: its images trained with their hard labels
    (same recipe, same per-stage lr and epochs), and the random subset of the same total IPC
    trained with soft labels from the same expert. (None, None) for hard-label sets."""
    if all(s.soft_labels is None for s in result.stages):
        return None, None
    ev = ev or cfg.evaluation
    hard = submit_progressive(
        "PDD hard labels", prepared.spec, [replace(s, soft_labels=None) for s in result.stages],
        EvalPlan(recipe_from_config(ev, cfg.augment.strategy), ev.runs, cfg.seed, ev.carry_optimizer_state),
        eval_sets_of(prepared.bundle), RunResources.of(ev), progress=progress,
    )
    setup = BaselineSetup(prepared.bundle, prepared.spec, ev, cfg.augment.strategy, cfg.seed, progress)
    rnd = submit_random_baseline(setup, cfg.distill.total_ipc, epochs=budget_epochs(ev, len(result.stages)),
                                 soft_labeller=stage1_labeller(cfg, prepared, result))
    return hard.result(), rnd.result()  # both submitted before either is waited for


def run(cfg: PddConfig, progress: bool = True, parent_run_id: str | None = None, run_name: str | None = None,
        on_stage=None, baselines: bool = True) -> RunReport:
    """Distill (or resume) and evaluate; returns the report and writes ``results.json``.

    The whole run holds the run directory's lock (:func:`pdd_ray.distill.identity.run_lock`): a
    concurrent run of the same config waits, then reuses the finished experts and stages.
    With ``tracking.enabled`` the run is logged to MLflow (as a child of ``parent_run_id``
    when a sweep drives it); ``on_stage(k, outcome)`` is called after every stage.
    """
    ensure_storage(cfg)
    prepared = prepare(cfg)
    with run_lock(cfg):  # a second run of this config waits here, then reuses the first one's work
        return _tracked_run(cfg, prepared, progress, parent_run_id, run_name, on_stage, baselines)


def _tracked_run(cfg: PddConfig, prepared: Prepared, progress: bool, parent_run_id: str | None,
                 run_name: str | None, on_stage, baselines: bool) -> RunReport:
    """:func:`run` once its run directory is locked: Ray, the MLflow run, the work, the report."""
    ensure_ray()
    from pdd_ray.tracking import tracked

    with tracked(cfg, parent_id=parent_run_id, run_name=run_name) as tracker:  # closed however the body ends
        if tracker is not None:
            tracker.log_dataset(prepared.bundle)
        report = _run(cfg, prepared, progress, tracker, on_stage, baselines)
        if tracker is not None:
            tracker.on_report(report)
    return report


def _run(cfg: PddConfig, prepared: Prepared, progress: bool, tracker, on_stage, baselines: bool) -> RunReport:
    t_start = time.perf_counter()
    result = distill(cfg, prepared, progress=progress, on_stage=on_stage, tracker=tracker)
    seconds = dict(result.seconds)
    # The baselines' runs are submitted first (the longest runs first keeps both cores busy to
    # the end), then PDD's; all share the CPUs. "evaluation" is the time until PDD's results are
    # in, "baselines" the time after that until theirs are.
    t0 = time.perf_counter()
    pending_baselines = []
    if baselines and cfg.evaluation.baselines:
        ev, aug, total_ipc = cfg.evaluation, cfg.augment.strategy, cfg.distill.total_ipc
        setup = BaselineSetup(prepared.bundle, prepared.spec, ev, aug, cfg.seed, progress, baseline_cache(cfg))
        # equal training budget: the one-stage random subset trains as long as all P stages together
        pending_baselines = [submit_full_baseline(setup),
                             submit_random_baseline(setup, total_ipc, epochs=budget_epochs(ev, cfg.distill.num_stages))]
    try:
        with phase("evaluation"):
            pdd = evaluate_distilled(cfg, prepared, result, progress)
        seconds["evaluation"] = time.perf_counter() - t0
        random = full = None
        if pending_baselines:
            t0 = time.perf_counter()
            with phase("baselines"):
                full, random = (p.result() for p in pending_baselines)
            seconds["baselines"] = time.perf_counter() - t0
    except BaseException:  # a failed run or Ctrl-C: nothing may keep computing unread baselines
        for p in pending_baselines:
            p.cancel()
        raise
    seconds["total"] = time.perf_counter() - t_start
    hard, random_soft = soft_label_controls(cfg, prepared, result, progress) if baselines else (None, None)
    report = RunReport(result, pdd, random, full, seconds, budget_epochs(cfg.evaluation, cfg.distill.num_stages),
                       pdd_hard=hard, random_soft=random_soft)
    (result.directory / "results.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def training_budget_line(cfg: PddConfig, baselines: bool = True) -> str:
    """The table's training budget: what every row but full data trained for (equal budget)."""
    ev, p = cfg.evaluation, cfg.distill.num_stages
    line = f"training budget: {budget_epochs(ev, p)} epochs per row (PDD {p} stages x {ev.epochs_per_stage}"
    if not baselines:  # no baseline rows to compare with
        return line + ")"
    return line + f", random subset {budget_epochs(ev, p)} in one stage); full data {ev.full_epochs} epochs"


def baseline_cache(cfg: PddConfig) -> Folder:
    """``<storage>/baselines``: baseline results by digest of what they consume."""
    return Folder.at(cfg.storage_root) / "baselines"


def print_report(cfg: PddConfig, report: RunReport) -> None:
    """The table users look at first, plus where everything was written."""
    print()
    print(f"{cfg.name}: {cfg.data.dataset}, {cfg.distill.num_stages} stages x {cfg.distill.ipc_per_stage} images "
          f"per class, {cfg.evaluation.runs} evaluation runs (mean ± std test accuracy, %)")
    print(training_budget_line(cfg, baselines=report.random is not None or report.full is not None))
    print(format_table(report.rows()))
    print()
    print(f"artifact: {report.distilled.artifact}  (grids: grid_stage_*.png)")
    print(f"results:  {report.distilled.directory / 'results.json'}")
    print(f"time:     {report.seconds.get('total', 0):.0f} s")
