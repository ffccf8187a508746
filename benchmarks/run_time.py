"""Wall time of a whole ``pdd-ray run``, split by phase, from a cold start.

Why: the first-run promise ("a few minutes on a laptop CPU") is about the whole command a
newcomer pastes, not one matching step. This runs ``pdd-ray run [CONFIG] --no-progress`` in a
fresh storage folder (nothing cached: experts, stages and baselines are all computed), times
the command end to end and reads the per-phase seconds the run writes to ``results.json``:

* experts: stage 1's expert trajectories (Ray actors, in parallel);
* stages: each stage's Ray Train fit *minus* its in-loop validation, and within it (rows not
  added into the total) the iterations' own work (``steps_k``: update, all-reduce, optimiser,
  rank 0's wall time) and the rest, mostly Ray Train's start and stop (controller, worker
  actor, torch.distributed, the final checkpoint; also the checkpoints and progress reports
  between iterations); runs recorded before ``steps_k`` show "–" there;
* validation: the stages' in-loop validation (rank 0's wall time);
* transitions: the experts conditioned on S_<=k for the next stage;
* evaluation: the progressive evaluation of the distilled sets;
* baselines: random subset and full data at the same budget;
* startup and other: the command's wall time minus all of the above (interpreter, imports, Ray
  start and stop, MLflow, writing the artifact).

``--processes`` also samples ``/proc`` while the command runs: CPU seconds by process role (the
stage worker, evaluation tasks, experts, the driver, Ray's own actors and daemons) and how busy
the cores were (``benchmarks/process_cpu.py``); on 2 cores the run is CPU-bound, so this says
where its time really goes.

``--schedule serial`` emulates the official code's schedule on the same machine: one expert or
transition network at a time using every core (``experts.cpus`` = all cores), validation in the
stage's one process. ``--source PATH`` runs another checkout (e.g. a ``git worktree`` of an
older commit) to measure "before".

``--fit`` runs nothing: it fits the whole command's wall time against the stage iterations'
seconds over the runs already in ``--out`` (least squares, one line) and prints the iteration
time at which a target (``--target-s``, default 240) is met. Why: this VM's speed drifts by 2x
between hours, and the iterations are the same work in every run of the default config, so their
seconds are the run's own measure of the machine; the fit says how much of a wall-time change the
machine explains, and the residual what is left for the code.

    python benchmarks/run_time.py [--config digits] [--schedule parallel|serial] [--source PATH]
                                  [--label after] [--processes] [--out benchmarks/results/run_time.json]
    python benchmarks/run_time.py --fit [--target-s 240]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself: run as a script
from process_cpu import ProcessCPU  # noqa: E402
from process_cpu import markdown as cpu_markdown  # noqa: E402

PHASES = ("experts", "stages", "validation", "transitions", "evaluation", "baselines", "startup and other")
#: Parts of "stages", shown under it and not added into the whole command's sum.
STAGE_PARTS = ("stages: iterations", "stages: Ray Train start and stop")


def phase_split(seconds: dict[str, float], wall: float) -> dict[str, float]:
    """results.json's ``seconds`` folded into :data:`PHASES` (``stage_k`` includes ``validation_k``)."""
    def total(prefix: str) -> float:
        return sum(v for k, v in seconds.items() if k.startswith(prefix))

    validation = total("validation_")
    out = {
        "experts": seconds.get("experts", 0.0),
        "stages": total("stage_") - validation,
        "validation": validation,
        "transitions": total("transition_"),
        "evaluation": seconds.get("evaluation", 0.0),
        "baselines": seconds.get("baselines", 0.0),
    }
    out["startup and other"] = wall - sum(out.values())
    if any(k.startswith("steps_") for k in seconds):
        out[STAGE_PARTS[0]] = total("steps_")
        out[STAGE_PARTS[1]] = out["stages"] - out[STAGE_PARTS[0]]
    return out


def run_once(config: str, schedule: str, source: Path | None, extra: list[str], processes: bool = False) -> dict:
    """One cold ``pdd-ray run`` in a fresh storage folder; its wall time, phases and table, and
    with ``processes`` the CPU seconds by process role (:mod:`process_cpu`)."""
    overrides = list(extra)
    if schedule == "serial":
        overrides.append(f"experts.cpus={os.cpu_count() or 1}")
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    with tempfile.TemporaryDirectory(prefix="pdd-run-time-") as tmp:
        cmd = [sys.executable, "-m", "pdd_ray", "run", config, f"storage={tmp}/storage", "--no-progress", *overrides]
        sampler = ProcessCPU() if processes else None
        if sampler is not None:
            sampler.start()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cpu = sampler.stop() if sampler is not None else None
        if proc.returncode != 0:
            raise SystemExit(f"run_time: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results = next(Path(tmp, "storage").rglob("results.json"))
        report = json.loads(results.read_text())
    seconds = report["seconds"]
    out = {"command": " ".join(cmd[2:]), "wall_seconds": wall, "seconds": seconds,
           "phases": phase_split(seconds, wall), "table": proc.stdout.strip().splitlines()[-12:]}
    if cpu is not None:
        out["processes"] = cpu
    return out


def markdown(runs: dict[str, dict]) -> str:
    """Phases as rows, labelled runs as columns."""
    labels = list(runs)
    lines = ["| phase | " + " | ".join(labels) + " |", "|---" * (1 + len(labels)) + "|"]
    for phase in PHASES[:2] + STAGE_PARTS + PHASES[2:]:
        cells = [runs[l]["phases"].get(phase) for l in labels]
        name = f"&nbsp;&nbsp;{phase.split(': ')[1]}" if phase in STAGE_PARTS else phase
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    lines.append("| **wall (whole command)** | " + " | ".join(f"**{runs[l]['wall_seconds']:.1f}**" for l in labels) + " |")
    return "\n".join(lines)


def wall_fit(runs: dict[str, dict], target_s: float) -> str:
    """Least-squares line wall = a + b * iterations over the runs that recorded their iterations,
    as a small table and one summary line (see the module docstring's ``--fit``)."""
    points = sorted((r["phases"]["stages: iterations"], r["wall_seconds"], label) for label, r in runs.items()
                    if r.get("phases", {}).get("stages: iterations"))
    if len(points) < 2:
        return f"--fit needs at least 2 runs with the iterations' seconds recorded; found {len(points)}"
    n = len(points)
    mean_x = sum(p[0] for p in points) / n
    mean_y = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mean_x) ** 2 for p in points)
    if sxx == 0:
        return "--fit needs runs whose iterations took different times"
    slope = sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / sxx
    icept = mean_y - slope * mean_x
    lines = ["| run | iterations s | wall s | fit s | residual s |", "|---|---|---|---|---|"]
    residuals = []
    for x, y, label in points:
        fit = icept + slope * x
        residuals.append(y - fit)
        lines.append(f"| {label} | {x:.1f} | {y:.1f} | {fit:.1f} | {y - fit:+.1f} |")
    rms = (sum(r * r for r in residuals) / n) ** 0.5
    at_target = (target_s - icept) / slope if slope > 0 else float("nan")
    lines.append("")
    lines.append(f"wall = {icept:.1f} s + {slope:.2f} x iterations' seconds over {n} runs (rms residual {rms:.1f} s); "
                 f"{target_s:.0f} s is met where the iterations take {at_target:.1f} s or less")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="digits", help="preset or YAML file (default: digits, the first run)")
    ap.add_argument("--schedule", choices=("parallel", "serial"), default="parallel",
                    help="serial: the official code's schedule (one expert/transition network at a time)")
    ap.add_argument("--source", type=Path, default=None, help="run this checkout of pdd_ray instead (PYTHONPATH)")
    ap.add_argument("--label", default=None, help="column name in the table (default: the schedule)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/run_time.json"),
                    help="JSON file; runs with other labels already in it are kept")
    ap.add_argument("--processes", action="store_true",
                    help="also sample CPU seconds by process role from /proc (Linux; benchmarks/process_cpu.py)")
    ap.add_argument("--fit", action="store_true",
                    help="run nothing: fit wall time against the iterations' seconds over the runs in --out")
    ap.add_argument("--target-s", type=float, default=240.0, help="wall-time target for --fit (default 240)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to pdd-ray run")
    args = ap.parse_args(argv)
    if args.fit:
        if not args.out.is_file():
            ap.error(f"--fit reads runs from --out, and {args.out} does not exist")
        print(wall_fit(json.loads(args.out.read_text()).get("runs", {}), args.target_s))
        return 0
    label = args.label or args.schedule
    runs: dict[str, dict] = {}
    if args.out.is_file():
        runs = json.loads(args.out.read_text()).get("runs", {})
    print(f"run_time: {label}: pdd-ray run {args.config} ({args.schedule}) ...", file=sys.stderr, flush=True)
    load = os.getloadavg()
    result = run_once(args.config, args.schedule, args.source, args.overrides, args.processes)
    runs[label] = {**result, "schedule": args.schedule, "source": str(args.source or "this checkout"),
                   "load_average_start": load, "cpu_count": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    from pdd_ray.atomic import write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"benchmark": "pdd-ray run wall time by phase", "runs": runs}, indent=2))
    table = markdown(runs)
    write_text_atomic(args.out.with_suffix(".md"), table + "\n")
    print(table)
    if "processes" in result:
        print(f"\nCPU by process role, {label}:\n" + cpu_markdown(result["processes"]))
    print("\n".join(result["table"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
