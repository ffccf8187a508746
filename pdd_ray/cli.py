"""``pdd-ray``: the command line. Thin: parse, load config, call the library, print.

Every :class:`PddError` is printed as ``pdd-ray: error: <one line>`` with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pdd_ray import __version__
from pdd_ray.atomic import write_text_atomic
from pdd_ray.errors import PddError


def _config_args(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument("config", nargs="?", default=None, help=config_help)
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help="config overrides")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _collect_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Overrides are accepted anywhere among the options (``run digits seed=1 --no-progress
    storage=/x``): argparse fills a positional list only once, so the words it left over are
    appended to the command's overrides (the command sorts out a config name among them, see
    :func:`pdd_ray.config.split_config_and_overrides`); unknown options are refused as argparse would."""
    rest = [w for w in extra if w.startswith("-") or not hasattr(args, "overrides")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if extra:
        args.overrides = list(args.overrides) + list(extra)


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pdd_ray.config import load_config, split_config_and_overrides
    from pdd_ray.evaluation import BaselineSetup, evaluate_full_baseline, evaluate_random_baseline, format_table
    from pdd_ray.prepare import prepare
    from pdd_ray.runtime import ensure_ray
    from pdd_ray.storage import is_remote

    is_artifact = args.artifact is not None and (is_remote(args.artifact) or Path(args.artifact).exists())
    if is_artifact and not args.artifact.endswith((".yaml", ".yml")):  # a local folder or an object-store URI
        from pdd_ray.distill.reevaluate import reevaluate_artifact

        return reevaluate_artifact(args)
    config, overrides = split_config_and_overrides(args.artifact, args.overrides)
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.runs:
        overrides.append(f"evaluation.runs={args.runs}")
    if args.arch:
        overrides.append(f"model.arch={args.arch}")
    cfg = load_config(config, overrides)
    if args.baseline is None:
        raise PddError("nothing to evaluate: pass an artifact directory or --baseline random|full")
    if args.baseline == "random" and (args.ipc is None or args.ipc < 1):
        raise PddError(f"--baseline random needs --ipc N with N >= 1, got {args.ipc}")
    prepared = prepare(cfg)
    ensure_ray()
    progress = not args.no_progress
    setup = BaselineSetup(prepared.bundle, prepared.spec, cfg.evaluation, cfg.augment.strategy, cfg.seed, progress)
    if args.baseline == "random":
        res = evaluate_random_baseline(setup, args.ipc)
        detail = f"ipc {args.ipc}, {cfg.evaluation.runs} runs"
    else:
        res = evaluate_full_baseline(setup)
        detail = f"{cfg.evaluation.full_epochs} epochs, {cfg.evaluation.runs} runs"
    mean, std = res.final
    vmean, vstd = float(res.mean("val")[-1] * 100), float(res.std("val")[-1] * 100)
    print(f"dataset {cfg.data.dataset}, model {prepared.spec.arch}")
    print(format_table([(res.name, detail, mean, std)]))
    print(f"(validation {vmean:.2f} ± {vstd:.2f})")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(res.to_dict(), indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# experts, run
# ----------------------------------------------------------------------------------------------


def cmd_experts(args: argparse.Namespace) -> int:
    from pdd_ray.config import load_config, split_config_and_overrides
    from pdd_ray.experts.produce import expert_store_root, stage1_experts
    from pdd_ray.prepare import prepare
    from pdd_ray.runtime import ensure_ray, ensure_storage

    config, overrides = split_config_and_overrides(args.config, args.overrides)
    cfg = load_config(config, overrides)
    ensure_storage(cfg)
    prepared = prepare(cfg)
    ensure_ray()
    from pdd_ray.tracking import tracked

    with tracked(cfg, run_name=f"{cfg.name}/experts", extra_tags={"pdd.kind": "experts"}) as tracker:
        if tracker is not None:
            tracker.log_dataset(prepared.bundle)
        key, summaries = stage1_experts(cfg, prepared, progress=not args.no_progress)
        if tracker is not None:
            tracker.on_experts(key, summaries)
    if summaries:
        accs = [s["final_val_acc"] * 100 for s in summaries]
        print(f"trained {len(summaries)} experts; final validation accuracy "
              f"{sum(accs) / len(accs):.2f}% (min {min(accs):.2f}, max {max(accs):.2f})")
    else:
        print(f"all {cfg.experts.num_experts} experts already present; nothing to train")
    print(f"store: {expert_store_root(cfg)}/{key}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pdd_ray.config import load_config, split_config_and_overrides
    from pdd_ray.pipeline import print_report, run

    config, overrides = split_config_and_overrides(args.config, args.overrides)
    if args.no_baselines:
        overrides.append("evaluation.baselines=false")
    cfg = load_config(config, overrides)
    report = run(cfg, progress=not args.no_progress)
    print_report(cfg, report)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pdd_ray.sweep import load_sweep, run_sweep

    run_sweep(load_sweep(args.sweep, args.overrides), progress=not args.no_progress)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pdd_ray.ui import serve

    return serve(args.storage, port=args.port, experiment=args.experiment)


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------


def _evaluate_parser(sub) -> None:
    """The ``pdd-ray evaluate`` subcommand."""
    p = sub.add_parser(
        "evaluate",
        help="evaluate a distilled artifact, or a random-subset / full-data baseline",
        description="Evaluate a distilled artifact (progressive training, several runs in parallel) or a "
        "baseline: a random real subset at --ipc images per class, or the full training set.",
    )
    p.add_argument("artifact", nargs="?", default=None, help="artifact directory, or a config preset/YAML for baselines")
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help="config overrides")
    p.add_argument("--baseline", choices=["random", "full"], help="evaluate a baseline instead of an artifact")
    p.add_argument("--dataset", help="dataset name (overrides data.dataset)")
    p.add_argument("--root", help="dataset root directory (overrides data.root)")
    p.add_argument("--ipc", type=int, help="images per class of the random subset")
    p.add_argument("--runs", type=int, help="independent runs (overrides evaluation.runs)")
    p.add_argument("--arch", help="architecture to evaluate on (convnet, resnet18, vgg11, alexnet)")
    p.add_argument("--json", help="also write the per-run scores as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=cmd_evaluate)


def _experts_parser(sub) -> None:
    """The ``pdd-ray experts`` subcommand."""
    p = sub.add_parser(
        "experts",
        help="train the expert trajectories of a config (parallel, resumable)",
        description="Train the stage-1 expert trajectories of a config on Ray actors and store them as Arrow "
        "files; experts already in the store are skipped.",
    )
    _config_args(p, "preset name (e.g. digits, cifar10_ipc10) or YAML file; default: digits")
    p.set_defaults(handler=cmd_experts)


def _run_parser(sub) -> None:
    """The ``pdd-ray run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="distill a dataset with PDD and print the accuracy table (default: digits)",
        description="Progressive dataset distillation: experts, then each stage on Ray Train, transitions in "
        "between, then progressive evaluation against random-subset and full-data baselines. Re-running "
        "the same command resumes or skips finished work.",
    )
    _config_args(p, "preset name (e.g. digits, cifar10_ipc10) or YAML file; default: digits")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the random-subset and full-data rows (same as evaluation.baselines=false)")
    p.set_defaults(handler=cmd_run)


def _sweep_parser(sub) -> None:
    """The ``pdd-ray sweep`` subcommand."""
    p = sub.add_parser(
        "sweep",
        help="Ray Tune sweep over stage counts x images per class (default: configs/sweep_digits.yaml)",
        description="Run a Ray Tune search over num_stages x ipc_per_stage (grid, or fixed total IPC), with "
        "an ASHA scheduler that uses the stage index as time; prints the results table and writes the best "
        "config as YAML.",
    )
    p.add_argument("sweep", nargs="?", default="sweep_digits", help="sweep preset or YAML file")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="overrides of the sweep's keys")
    p.add_argument("--no-progress", action="store_true", help="quieter Tune output")
    p.set_defaults(handler=cmd_sweep)


def _ui_parser(sub) -> None:
    """The ``pdd-ray ui`` subcommand."""
    p = sub.add_parser(
        "ui",
        help="browse a run's results in the MLflow UI (127.0.0.1)",
        description="Start an MLflow server on the run's sqlite store, bound to 127.0.0.1, print the URL of the "
        "runs page, and stop on Ctrl-C.",
    )
    p.add_argument("storage", nargs="?", default="outputs/digits", help="the run's storage folder (holds mlflow.db)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--experiment", default="pdd_ray", help="experiment to open")
    p.set_defaults(handler=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdd-ray",
        description="Progressive Dataset Distillation (PDD) on Ray: distill a dataset into a few "
        "synthetic images per class, stage by stage.",
    )
    parser.add_argument("--version", action="version", version=f"pdd_ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for register in (_evaluate_parser, _experts_parser, _run_parser, _sweep_parser, _ui_parser, *_EXTRA_COMMANDS):
        register(sub)
    for name, p in sub.choices.items():  # the README promises --no-progress on every command
        try:
            p.add_argument("--no-progress", action="store_true",
                           help="no progress bars (this command draws none, or none unless asked)")
        except argparse.ArgumentError:  # the command has its own
            pass
    return parser


def _jobs_commands(sub: argparse._SubParsersAction) -> None:
    from pdd_ray import jobs

    jobs.register(sub)


#: Other modules add their subcommands here (kept apart so this file stays small).
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_jobs_commands]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _collect_overrides(parser, args, extra)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    from pdd_ray.progress import disable_lines, enable_lines

    if getattr(args, "no_progress", False):  # no bars: plain progress lines instead (job logs, scripts)
        enable_lines()
    ray_was_up = _ray_initialized()
    try:
        return args.handler(args)
    except PddError as err:
        print(f"pdd-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from pdd_ray.runtime import shutdown_ray

        print("pdd-ray: interrupted", file=sys.stderr)
        shutdown_ray()
        return 130
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"pdd-ray: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    finally:
        disable_lines()
        if not ray_was_up:  # the command started (or joined) Ray: end it here, not in atexit
            from pdd_ray.runtime import shutdown_ray

            shutdown_ray()


def _ray_initialized() -> bool:
    """Whether Ray is up in this process already (a caller's, e.g. a notebook or a test
    session, which the command must leave running); Ray is not imported just to ask."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


#: Errors of the machine rather than of pdd_ray (a folder that cannot be created, a full or
#: read-only disk): one line, exit 2, like bad input.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
