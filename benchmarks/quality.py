"""Distilled-data quality on digits at equal total IPC, equal distillation-iteration budget and
equal training budget.

Compares, for each total IPC T (``--total-ipc 10 20``):

* random real subset, T images per class;
* each base method (``--methods mtt dm idc``) with P = 1: one stage of T images per class,
  ``budget`` iterations;
* PDD on that base (P = 2, 5, ...): P stages of T / P images per class, ``budget / P``
  iterations each (so every method spends the same total number of distillation iterations),
  optionally with forgetting-score discarding (``--discard 0 0.1 0.3``, P >= 2 rows only);
* full training data (once; it does not depend on T), with its own recipe
  (``evaluation.full_epochs``).

Equal training budget (``--eval-epochs E``, default 600): every row except full data trains
its evaluation networks for E epochs in total -- a P-stage set E / P epochs per stage
(``evaluation.epochs_per_stage``, see ``pdd_ray.evaluation.epochs_per_stage_for``), the random
subset and P = 1 rows E epochs in their one stage. E = 600 leaves the digits preset's P = 2
recipe (2 x 300) unchanged.

Everything else is the digits preset unchanged and identical across methods (experts:
8 x 20 epochs at lr 0.1; matching: max_start_epoch 6, expert_epochs 2, syn_steps 20, lr_img,
lr_lr, lr_init, eval_every 50 selection on the validation split; evaluation: 5 runs, E epochs per
row), so only the stage split differs. No per-method tuning.

Each method is distilled with ``pdd_ray.distill.driver.distill`` and evaluated with
``pdd_ray.pipeline.evaluate_distilled`` -- exactly the body of ``pdd_ray.pipeline.run`` minus
its baselines, which are evaluated once per T here (``pdd_ray.evaluation``) instead of once
per method. Stage-1 experts live in one content-addressed store shared by every method (the
methods share the expert settings, so they are produced once, timed separately, up front).
Accuracies are test accuracy (mean ± population std over runs) from the shared evaluator;
selection inside distillation uses the validation split only.

    python benchmarks/quality.py [--total-ipc 10 20] [--budget 200] [--eval-epochs 600] [--runs 5] [--stages 1 2 5]
                                 [--methods mtt dm idc] [--discard 0 0.1 0.3] [--no-random]
                                 [--storage DIR] [--out benchmarks/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from pdd_ray.atomic import write_text_atomic  # noqa: E402
from pdd_ray.config import PddConfig, load_config  # noqa: E402
from pdd_ray.distill.driver import distill  # noqa: E402
from pdd_ray.distill.identity import run_dir  # noqa: E402
from pdd_ray.evaluation import (  # noqa: E402
    BaselineSetup,
    EvalResult,
    epochs_per_stage_for,
    evaluate_full_baseline,
    evaluate_random_baseline,
)
from pdd_ray.experts.produce import expert_store_root, stage1_experts, stage1_jobs  # noqa: E402
from pdd_ray.experts.store import TrajectoryStore  # noqa: E402
from pdd_ray.pipeline import evaluate_distilled, soft_label_controls  # noqa: E402
from pdd_ray.prepare import prepare  # noqa: E402


def write_text(path: Path, text: str) -> None:
    """Atomic write (:func:`pdd_ray.atomic.write_text_atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def method_name(p: int, base: str = "mtt", discard: float = 0.0) -> str:
    """"MTT (P = 1)", "PDD+MTT (P = 2)", "PDD+DM (P = 2), discard 30%"...; MTT rows keep the
    historical "PDD (P = p)" label so earlier tables stay comparable."""
    b = base.upper()
    if p == 1:
        name = f"{b} (P = 1)"
    else:
        name = f"PDD (P = {p})" if base == "mtt" else f"PDD+{b} (P = {p})"
    return name + (f", discard {discard * 100:.0f}%" if discard else "")


def acc(res: EvalResult) -> dict:
    """Per-stage mean/std test and val accuracy (percent) plus the raw per-run scores."""
    out = {
        "test_mean": [float(v) * 100 for v in res.mean("test")],
        "test_std": [float(v) * 100 for v in res.std("test")],
        "val_mean": [float(v) * 100 for v in res.mean("val")],
        "val_std": [float(v) * 100 for v in res.std("val")],
        "scores": {k: v.tolist() for k, v in res.scores.items()},
    }
    out["final_test_mean"], out["final_test_std"] = out["test_mean"][-1], out["test_std"][-1]
    out["final_val_mean"] = out["val_mean"][-1]
    return out


def config_for(args, total_ipc: int, p: int, base: str = "mtt", discard: float = 0.0) -> PddConfig:
    extra = "".join("-" + kv.replace("=", "").replace(".", "_") for kv in args.set)
    datm = ["experts.keep_all_epochs=true"] if base == "datm" else []  # one expert set (and labeller) for every P
    return load_config("digits", [
        f"name=quality-{base}-ipc{total_ipc}-p{p}" + (f"-discard{discard:g}" if discard else "") + extra,
        *datm,
        f"method={base}",
        f"distill.discard_fraction={discard}",
        f"storage={args.storage}",
        f"seed={args.seed}",
        f"distill.num_stages={p}",
        f"distill.ipc_per_stage={total_ipc // p}",
        f"distill.iterations={args.budget // p}",
        f"evaluation.epochs_per_stage={epochs_per_stage_for(args.eval_epochs, p)}",
        f"evaluation.runs={args.runs}",
        "tracking.enabled=false",
        *args.set,
    ])


def expert_context(cfg: PddConfig, prepared) -> dict:
    """Stage-1 experts' validation accuracy where matching reaches and at the end (context for
    the 'distilled data cannot beat its experts' ceiling)."""
    store = TrajectoryStore(expert_store_root(cfg))
    key = stage1_jobs(cfg, prepared)[0].key
    reach = cfg.distill.max_start_epoch + cfg.distill.expert_epochs
    at_reach, final = [], []
    for j in store.indices(key):
        with store.open(key, j) as r:
            va = r.meta.get("val_acc") or []
            if len(va) > reach:
                at_reach.append(va[reach])
            final.append(r.meta.get("final_val_acc", float("nan")))
    mean = lambda xs: float(sum(xs) / len(xs) * 100) if xs else None  # noqa: E731
    return {"key": key, "experts": len(final), "reach_epoch": reach, "val_acc_at_reach": mean(at_reach),
            "final_epoch": cfg.experts.epochs, "val_acc_final": mean(final)}


def fmt(mu: float, sd: float) -> str:
    return f"{mu:5.2f} ± {sd:4.2f}"


def markdown(result: dict) -> str:
    lines = [
        "# Distilled-data quality on digits (equal total IPC, equal iteration and training budget)",
        "",
        f"Training budget {result['eval_epochs']} evaluation epochs per row (a P-stage set trains "
        f"{result['eval_epochs']} / P epochs per stage, random subset and P = 1 all {result['eval_epochs']} in one "
        f"stage; full data its own {result['shared_settings']['evaluation']['full_epochs']} epochs). "
        f"Budget {result['budget']} distillation iterations in total per method (iterations per stage = budget / P); "
        f"{result['runs']} evaluation runs each, test accuracy % (mean ± std). Experts: {result['experts']['experts']} "
        f"x {result['experts']['final_epoch']} epochs, val acc {result['experts']['val_acc_at_reach']:.2f}% at epoch "
        f"{result['experts']['reach_epoch']} (furthest matching target), {result['experts']['val_acc_final']:.2f}% at "
        f"epoch {result['experts']['final_epoch']}. Shared stage-1 experts: {result['seconds']['shared_experts']:.0f} s "
        "(not counted in the per-method wall times).",
        "",
    ]
    for block in result["settings"]:
        t = block["total_ipc"]
        lines += [f"## total IPC {t}", "",
                  "| method | stages × IPC | iterations / stage | epochs / stage | test acc after each stage | "
                  "final test acc | distill s | eval s | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, label in (("random", "random subset"), ("random_soft", "random subset, soft labels (DATM's expert)")):
            r = block.get(key)
            if r:
                lines.append(f"| {label} | 1 × {t} | – | {r.get('epochs', '–')} | – | "
                             f"{fmt(r['final_test_mean'], r['final_test_std'])} | – | {r['seconds']:.0f} | {r['seconds']:.0f} |")
        for m in block["methods"]:
            curve = " → ".join(f"{v:.2f}" for v in m["accuracy"]["test_mean"])
            label = m["method"]
            if m.get("discard_fraction") and m.get("real_examples"):
                later = m["real_examples"].get(f"stage_{m['stages']}")
                label += f" ({later} real examples in later stages)"
            lines.append(
                f"| {label} | {m['stages']} × {m['ipc_per_stage']} | {m['iterations_per_stage']} | "
                f"{m.get('epochs_per_stage', '–')} | {curve} | "
                f"{fmt(m['accuracy']['final_test_mean'], m['accuracy']['final_test_std'])} | "
                f"{m['seconds']['distill']:.0f} | {m['seconds']['evaluation']:.0f} | {m['seconds']['wall']:.0f}"
                f"{' (resumed)' if m['resumed_stages'] else ''} |")
            h = m.get("hard_labels")
            if h:
                curve = " → ".join(f"{v:.2f}" for v in h["test_mean"])
                lines.append(f"| {label}, same images with hard labels | {m['stages']} × {m['ipc_per_stage']} | – | "
                             f"{m.get('eval_epochs_per_stage', '–')} | {curve} | {fmt(h['final_test_mean'], h['final_test_std'])} | – | {h['seconds']:.0f} | – |")
        f = result.get("full")
        if f:
            lines.append(f"| full data | all images | – | {f.get('epochs', '–')} | – | {fmt(f['final_test_mean'], f['final_test_std'])} | – | "
                         f"{f['seconds']:.0f} | {f['seconds']:.0f} |")
        lines.append("")
    lines += ["Wall times are on a 2-core machine shared with other jobs; they are indicative only.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total-ipc", type=int, nargs="+", default=[10], help="total images per class (default 10)")
    ap.add_argument("--budget", type=int, default=200, help="total distillation iterations per method (default 200)")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 5], help="stage counts P (1 = MTT; default 1 2 5)")
    ap.add_argument("--eval-epochs", type=int, default=600,
                    help="training budget: evaluation epochs per row in total, E / P per stage (default 600)")
    ap.add_argument("--runs", type=int, default=5, help="evaluation runs per method (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", type=Path, default=None,
                    help="where experts and runs go (default: a temporary directory, removed at the end)")
    ap.add_argument("--methods", nargs="+", default=["mtt"], choices=["mtt", "dm", "idc", "datm"],
                    help="base methods, each at every --stages (default mtt)")
    ap.add_argument("--discard", type=float, nargs="+", default=[0.0],
                    help="forgetting-score discard fractions, applied to P >= 2 rows (default 0)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every distilled row (e.g. idc.factor=1)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-data baseline")
    ap.add_argument("--no-random", action="store_true", help="skip the random-subset baseline")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    ap.add_argument("--md", type=Path, default=None, help="markdown table (default: --out with .md)")
    args = ap.parse_args(argv)
    for t in args.total_ipc:
        for p in args.stages:
            if t % p:
                ap.error(f"total IPC {t} is not divisible by P = {p}")
    for p in args.stages:
        if args.budget % p:
            ap.error(f"--budget {args.budget} is not divisible by P = {p}")
        if args.eval_epochs % p:
            ap.error(f"--eval-epochs {args.eval_epochs} is not divisible by P = {p}")
    md_path = args.md or args.out.with_suffix(".md")
    temp_storage = args.storage is None
    args.storage = Path(tempfile.mkdtemp(prefix="pdd-bench-quality-")) if temp_storage else args.storage.resolve()

    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)
    t_all = time.perf_counter()
    base = config_for(args, args.total_ipc[0], 1)  # its evaluation config trains the whole budget in one stage
    prepared = prepare(base)  # data, split and model are identical across methods
    result: dict = {
        "benchmark": "quality",
        "dataset": "digits",
        "budget": args.budget,
        "eval_epochs": args.eval_epochs,
        "runs": args.runs,
        "seed": args.seed,
        "storage": str(args.storage) if not temp_storage else None,
        "shared_settings": {
            "experts": base.experts.model_dump(mode="json"),
            "distill": {k: v for k, v in base.distill.model_dump(mode="json").items()
                        if k not in ("num_stages", "ipc_per_stage", "iterations")},
            "evaluation": base.evaluation.model_dump(mode="json"),
            "augment": base.augment.strategy,
        },
        "seconds": {},
        "settings": [],
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                 "torch": torch.__version__, "ray": ray.__version__},
    }

    def save() -> None:
        result["seconds"]["total"] = time.perf_counter() - t_all
        result["host"]["loadavg_now"] = os.getloadavg()
        write_text(args.out, json.dumps(result, indent=2))
        if result.get("experts"):
            write_text(md_path, markdown(result))

    try:
        t0 = time.perf_counter()
        stage1_experts(base, prepared, progress=False)
        result["seconds"]["shared_experts"] = time.perf_counter() - t0
        result["experts"] = expert_context(base, prepared)
        print(f"shared stage-1 experts: {result['seconds']['shared_experts']:.0f} s "
              f"(val acc {result['experts']['val_acc_at_reach']:.2f}% at epoch {result['experts']['reach_epoch']}, "
              f"{result['experts']['val_acc_final']:.2f}% at epoch {result['experts']['final_epoch']})", flush=True)
        ev, aug = base.evaluation, base.augment.strategy

        if not args.no_full:
            t0 = time.perf_counter()
            full = evaluate_full_baseline(BaselineSetup(prepared.bundle, prepared.spec, ev, aug, args.seed, False))
            result["full"] = {**acc(full), "seconds": time.perf_counter() - t0, "epochs": ev.full_epochs}
            print(f"full data: {fmt(result['full']['final_test_mean'], result['full']['final_test_std'])} "
                  f"({result['full']['seconds']:.0f} s)", flush=True)
            save()

        for t in args.total_ipc:
            block: dict = {"total_ipc": t, "methods": []}
            result["settings"].append(block)
            if not args.no_random:
                t0 = time.perf_counter()
                rnd = evaluate_random_baseline(BaselineSetup(prepared.bundle, prepared.spec, ev, aug, args.seed, False),
                                               t, epochs=args.eval_epochs)
                block["random"] = {**acc(rnd), "seconds": time.perf_counter() - t0, "epochs": args.eval_epochs}
                print(f"[ipc {t}] random subset: "
                      f"{fmt(block['random']['final_test_mean'], block['random']['final_test_std'])}"
                      f" ({block['random']['seconds']:.0f} s)", flush=True)
                save()
            rows = [(b, p, f) for b in args.methods for p in args.stages for f in args.discard if p > 1 or f == 0]
            for base_method, p, discard in rows:
                cfg = config_for(args, t, p, base_method, discard)
                directory = run_dir(cfg)
                resumed = [k for k in range(1, p + 1) if (directory / f"stage_{k}" / "manifest.json").is_file()]
                t0 = time.perf_counter()
                dres = distill(cfg, prepared, progress=False)
                t_distill = time.perf_counter() - t0
                t0 = time.perf_counter()
                pdd = evaluate_distilled(cfg, prepared, dres, progress=False)["convnet"]
                t_eval = time.perf_counter() - t0
                t0 = time.perf_counter()
                hard, rnd_soft = soft_label_controls(cfg, prepared, dres, False)  # (None, None) without soft labels
                t_controls = time.perf_counter() - t0  # both controls together
                if rnd_soft is not None and "random_soft" not in block:
                    block["random_soft"] = {**acc(rnd_soft), "seconds": t_controls, "labeller": dres.expert_keys[0],
                                          "epochs": args.eval_epochs}
                m = {
                    "hard_labels": {**acc(hard), "seconds": t_controls} if hard is not None else None,
                    "eval_epochs_per_stage": cfg.evaluation.epochs_per_stage,
                    "method": method_name(p, base_method, discard) + "".join(f", {kv}" for kv in args.set),
                    "overrides": list(args.set),
                    "base": base_method,
                    "discard_fraction": discard,
                    "real_examples": json.loads((dres.directory / "real_examples.json").read_text())
                    if (dres.directory / "real_examples.json").is_file() else None,
                    "stages": p,
                    "ipc_per_stage": t // p,
                    "iterations_per_stage": args.budget // p,
                    "epochs_per_stage": cfg.evaluation.epochs_per_stage,
                    "eval_epochs": cfg.evaluation.epochs_per_stage * p,
                    "total_iterations": (args.budget // p) * p,
                    "accuracy": acc(pdd),
                    "stage_outcomes": [{"stage": k + 1, "alpha": o.alpha, "best_val_acc": o.best_val_acc * 100,
                                        "best_iteration": o.best_iteration} for k, o in enumerate(dres.outcomes)],
                    "seconds": {"distill": t_distill, "evaluation": t_eval, "wall": t_distill + t_eval,
                                "breakdown": dres.seconds},
                    "resumed_stages": resumed,
                    "run_dir": str(dres.directory) if not temp_storage else None,
                }
                block["methods"].append(m)
                a = m["accuracy"]
                print(f"[ipc {t}] {m['method']:12s} {p} x {t // p} ipc, {args.budget // p} it/stage: "
                      f"{fmt(a['final_test_mean'], a['final_test_std'])} (per stage "
                      f"{' -> '.join(f'{v:.2f}' for v in a['test_mean'])}); distill {t_distill:.0f} s, "
                      f"eval {t_eval:.0f} s{' [resumed stages ' + str(resumed) + ']' if resumed else ''}", flush=True)
                save()
        save()
    finally:
        ray.shutdown()
        if temp_storage:
            shutil.rmtree(args.storage, ignore_errors=True)

    print()
    print(markdown(result))
    print(f"wrote {args.out} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
