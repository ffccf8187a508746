"""In-loop validation on a 2-CPU stage worker: networks one after another vs side by side.

Why: a stage worker with ``distill.cpus_per_worker`` = 2 (the digits preset) validates by
training ``distill.eval_runs`` networks. One after another, each network's operators run on 2
intra-op threads; side by side (``pdd_ray.distill.stage.score_side_by_side``), each network
gets one thread. Small networks (8x8 digits, a width-64 ConvNet) scale poorly over intra-op
threads, so side by side should finish sooner. This times exactly the production call,
``shared_mean`` over ``progressive_run``, at the digits preset's validation recipe, both ways,
alternating so a drift in the machine's speed hits both alike. The mean accuracy is printed for
both: side by side runs each network on one intra-op thread, so floats (and a few predictions)
may differ from one after another on two.

    python benchmarks/validation.py [--images 50,100] [--rounds 3] [--threads 2]
                                    [--out benchmarks/results/validation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pdd_ray.allocator import keep_freed_memory
from pdd_ray.atomic import write_text_atomic
from pdd_ray.config import load_config
from pdd_ray.distill.stage import shared_mean
from pdd_ray.distill.identity import selection_recipe
from pdd_ray.evaluation import StageSet, progressive_run, random_subset
from pdd_ray.prepare import prepare


def _digits(images: int) -> tuple:
    """A random real subset of ``images`` digits (balanced), the validation split, the preset's model and
    in-loop validation recipe (α = ``distill.lr_init``)."""
    cfg = load_config("digits", [])
    prepared = prepare(cfg)
    bundle, spec = prepared.bundle, prepared.spec
    x, y = random_subset(bundle, images // bundle.num_classes, cfg.seed)  # what stage 1 starts from
    return x, y, bundle.val_x, bundle.val_y, spec, {
        "runs": cfg.distill.eval_runs, "recipe": selection_recipe(cfg), "lr": cfg.distill.lr_init}


def _time(data: tuple, threads: int, side_by_side: bool) -> tuple[float, float]:
    """Seconds for one validation (all runs) of ``data`` (:func:`_digits`) and its mean accuracy."""
    x, y, vx, vy, spec, v = data

    def score(r: int) -> float:
        return progressive_run(spec, [StageSet(x, y, lr=v["lr"])], v["recipe"], {"val": (vx, vy)}, seed=1000 + r)["val"][-1]

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    mean = shared_mean(v["runs"], score, torch.device("cpu"), threads=threads if side_by_side else 1)
    return time.perf_counter() - t0, mean


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="50,100", help="synthetic set sizes to validate (stage 1 and 2 of digits)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per size (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="the worker's CPUs (default 2, the digits preset)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/validation.json"))
    args = ap.parse_args(argv)
    keep_freed_memory()
    rows = []
    for images in (int(s) for s in args.images.split(",")):
        data = _digits(images)
        _time(data, args.threads, True)  # warm-up: first-call allocations, lazy imports
        seq, par, means = [], [], {False: set(), True: set()}
        for _ in range(args.rounds):
            for side_by_side, out in ((False, seq), (True, par)):
                seconds, mean = _time(data, args.threads, side_by_side)
                out.append(seconds)
                means[side_by_side].add(round(mean, 6))
        row = {"images": images, "one_after_another_s": seq, "side_by_side_s": par,
               "median_speedup": statistics.median(seq) / statistics.median(par),
               "val_acc_one_after_another": sorted(means[False]), "val_acc_side_by_side": sorted(means[True])}
        rows.append(row)
        print(f"{images:4d} images: one after another {statistics.median(seq):.2f} s, side by side "
              f"{statistics.median(par):.2f} s (median of {args.rounds}): {row['median_speedup']:.2f}x; val acc "
              f"{row['val_acc_one_after_another']} vs {row['val_acc_side_by_side']}", flush=True)
    report = {"threads": args.threads, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
