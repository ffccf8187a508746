"""Expert production throughput on digits: experts per minute with 1 and 2 parallel workers.

Uses the digits preset's expert recipe (``experts.*`` of ``configs/digits.yaml``) and the
production code itself (``pdd_ray.experts.produce.stage1_jobs`` + ``produce``). The pool size
is controlled honestly through the Ray instance: ``produce`` sizes its actor pool from the
cluster's free CPUs and ``experts.cpus`` (1 per expert, one torch thread each), so a local
Ray instance started with ``num_cpus=W`` gives exactly W parallel workers. Every measurement
writes into a fresh temporary store, so nothing is reused between them.

Optionally (on by default, ``--no-transition`` to skip) it also times a PDD transition
(stage 1 -> 2) on the same pool: the transition jobs come from
``pdd_ray.distill.transition.transition_jobs`` with the freshly produced stage-1 experts and a
random real union of ``distill.ipc_per_stage`` images per class (α = ``distill.lr_init``),
so the parallel-vs-serial comparison covers the step PDD adds over MTT.

Times are end to end (actor start-up, data put, training, Arrow writes); the time to the
first finished expert is recorded too, so the start-up share is visible. Before each phase the
script waits until the instance's CPUs are free again (see ``wait_for_idle``: right after a
pool is killed ``produce`` may size the next pool at 1), and records what it saw before waiting.

    python benchmarks/experts.py [--experts 8] [--repeats 2] [--out benchmarks/results/experts.json]
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
import uuid
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from pdd_ray.atomic import write_text_atomic  # noqa: E402
from pdd_ray.config import load_config  # noqa: E402
from pdd_ray.distill.transition import transition_jobs  # noqa: E402
from pdd_ray.evaluation import StageSet, random_subset  # noqa: E402
from pdd_ray.experts.produce import produce, stage1_jobs  # noqa: E402
from pdd_ray.experts.store import TrajectoryStore  # noqa: E402
from pdd_ray.prepare import prepare  # noqa: E402
from pdd_ray.seeding import derive_seed  # noqa: E402


def write_json(path: Path, obj: dict) -> None:
    """Atomic write (:func:`pdd_ray.atomic.write_text_atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2))


def wait_for_idle(total_cpus: float, timeout: float = 60.0) -> dict:
    """Wait until every CPU of the local instance is free again.

    ``produce`` sizes its pool from ``ray.available_resources()`` at call time, and the actors
    of a previous pool are released asynchronously after ``ray.kill``: called right away, the
    next ``produce`` can see 0 free CPUs and fall back to a pool of ONE actor. We record what
    it would have seen, then wait, so each phase is measured with the pool size it asks for.
    """
    seen = float(ray.available_resources().get("CPU", 0))
    t0 = time.perf_counter()
    while ray.available_resources().get("CPU", 0) < total_cpus and time.perf_counter() - t0 < timeout:
        time.sleep(0.1)
    return {"free_cpus_immediately": seen, "waited_seconds": time.perf_counter() - t0,
            "free_cpus_at_call": float(ray.available_resources().get("CPU", 0))}


def timed_produce(store: TrajectoryStore, jobs, prepared, cpus: float, total_cpus: float) -> dict:
    """Run ``produce`` on all ``jobs`` (none present yet) on an idle instance and time it end to end."""
    idle = wait_for_idle(total_cpus)
    pool = max(1, min(len(jobs), int(idle["free_cpus_at_call"] // cpus)))
    done_at: list[float] = []
    t0 = time.perf_counter()
    summaries = produce(store, jobs, prepared, cpus=cpus, progress=False,
                        on_done=lambda s: done_at.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    if len(summaries) != len(jobs):
        raise RuntimeError(f"expected {len(jobs)} new experts, produced {len(summaries)} (store not fresh?)")
    return {
        "experts": len(jobs),
        "pool_size": pool,
        "free_cpus_before_wait": idle["free_cpus_immediately"],
        "seconds": wall,
        "experts_per_minute": 60.0 * len(jobs) / wall,
        "first_done_seconds": (done_at[0] - t0) if done_at else None,
        "mean_final_val_acc": sum(s["final_val_acc"] for s in summaries) / len(summaries),
    }


def measure(workers: int, overrides: list[str], with_transition: bool, scratch: Path) -> dict:
    """One measurement on a fresh local Ray instance with ``workers`` CPUs and a fresh store."""
    store_root = scratch / f"store-w{workers}-{uuid.uuid4().hex[:8]}"
    cfg = load_config("digits", [*overrides, f"experts.storage={store_root}", f"storage={scratch / 'runs'}"])
    prepared = prepare(cfg)
    ray.init(address="local", num_cpus=workers, logging_level="ERROR", log_to_driver=False)
    try:
        store = TrajectoryStore(str(store_root))
        jobs = stage1_jobs(cfg, prepared)
        out = {"workers": workers, "stage1": timed_produce(store, jobs, prepared, cfg.experts.cpus, workers)}
        if with_transition:
            b, d = prepared.bundle, cfg.distill
            x, y = random_subset(b, d.ipc_per_stage, derive_seed(cfg.seed, "bench-union"))
            union = [StageSet(x, y, lr=d.lr_init, epochs=cfg.evaluation.epochs_per_stage)]
            tjobs = transition_jobs(cfg, prepared, 1, jobs[0].key, union)
            out["transition"] = timed_produce(store, tjobs, prepared, cfg.experts.cpus, workers)
    finally:
        ray.shutdown()
        shutil.rmtree(store_root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8, help="experts per measurement (default 8)")
    ap.add_argument("--repeats", type=int, default=2, help="measurements per pool size, alternating 1,2,1,2,... (default 2)")
    ap.add_argument("--no-transition", action="store_true", help="skip the PDD transition timing")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/experts.json"))
    args = ap.parse_args(argv)
    if args.experts < 2:
        ap.error("--experts must be at least 2 (two workers need two jobs)")

    overrides = [f"experts.num_experts={args.experts}"]
    cfg = load_config("digits", overrides)
    scratch = Path(tempfile.mkdtemp(prefix="pdd-bench-experts-"))
    load_before = os.getloadavg()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        for rep in range(args.repeats):
            for w in (1, 2):
                r = measure(w, overrides, not args.no_transition, scratch)
                runs[w].append(r)
                line = f"[rep {rep + 1}] workers={w}: stage-1 pool {r['stage1']['pool_size']} {r['stage1']['seconds']:.1f} s " \
                       f"({r['stage1']['experts_per_minute']:.2f} experts/min)"
                if "transition" in r:
                    t = r["transition"]
                    line += (f"; transition pool {t['pool_size']} {t['seconds']:.1f} s ({t['experts_per_minute']:.2f}/min; "
                             f"free CPUs right after the stage-1 pool: {t['free_cpus_before_wait']:g})")
                print(line, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()

    def summary(kind: str) -> dict | None:
        if kind not in runs[1][0]:
            return None
        rate = {w: sum(r[kind]["experts_per_minute"] for r in runs[w]) / len(runs[w]) for w in (1, 2)}
        secs = {w: sum(r[kind]["seconds"] for r in runs[w]) / len(runs[w]) for w in (1, 2)}
        return {
            "experts_per_minute_1": rate[1],
            "experts_per_minute_2": rate[2],
            "seconds_1": secs[1],
            "seconds_2": secs[2],
            "speedup": rate[2] / rate[1],
            "scaling_efficiency": (rate[2] / rate[1]) / 2,
        }

    result = {
        "benchmark": "experts",
        "dataset": "digits",
        "experts": args.experts,
        "repeats": args.repeats,
        "recipe": cfg.experts.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "kept_epochs": cfg.distill.max_start_epoch + cfg.distill.expert_epochs,
        "transition_recipe": {"syn_epochs": cfg.distill.transition_syn_epochs,
                              "real_epochs": cfg.distill.max_start_epoch + cfg.distill.expert_epochs + 1,
                              "union_ipc": cfg.distill.ipc_per_stage, "alpha": cfg.distill.lr_init},
        "stage1": summary("stage1"),
        "transition": summary("transition"),
        "runs": {str(w): runs[w] for w in (1, 2)},
        "host": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
                 "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
        "note": "end-to-end wall time incl. actor start-up; the machine's cores are shared, so numbers are noisy",
    }
    write_json(args.out, result)
    for kind in ("stage1", "transition"):
        s = result[kind]
        if s is None:
            continue
        print(f"{kind:10s}: 1 worker {s['experts_per_minute_1']:.2f} experts/min, 2 workers "
              f"{s['experts_per_minute_2']:.2f} experts/min, speedup {s['speedup']:.2f}x, "
              f"scaling efficiency {s['scaling_efficiency']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
