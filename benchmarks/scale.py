"""Rehearsal of scale, part 1: what a cluster run would pay in transition traffic and in ranks
waiting for validation, measured on this machine with the real code paths.

Why: faults that only show on a cluster (100 copies of a 393 MB union through the object
store; W-1 ranks idle while rank 0 validates) cannot be seen at 8x8 on 2 cores by timing a
run, but their cost can be measured directly:

* ``transition``: bytes a transition serialises for its expert actors, before (every job
  carries the union inline) and after (``produce.shared_fields``: the union put once, jobs
  carry a reference), from the pickled sizes of a real ``ExpertJob`` and union at each preset's
  shape (stage P-1 -> P, the largest union). Ray stores an argument over 100 KiB in the object
  store, so these bytes are what goes through it.
* ``validation``: per rank, seconds busy training validation networks and seconds waiting in
  the all-reduce, for W = 1, 2, 4 ranks in a real gloo group, before (rank 0 trains all
  ``eval_runs`` networks) and after (``stage.shared_mean``). Networks: ConvNet width 32 on
  8x8 digits-shaped data. On 2 cores, W = 4 oversubscribes the machine: its busy seconds are
  inflated; the before/after split of busy vs waiting is the point.

    python benchmarks/scale.py [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

# preset -> (classes, channels, image size, stages, ipc per stage, experts)
PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "digits": (10, 1, 8, 2, 5, 8),
    "cifar10_ipc50": (10, 3, 32, 5, 10, 100),
    "cifar100_ipc50": (100, 3, 32, 5, 10, 100),
    "tiny_ipc50": (200, 3, 64, 5, 10, 100),
}
EVAL_RUNS = 4
MB = 1e6


def transition_bytes() -> dict:
    """Serialised bytes of one transition's jobs, inline vs shared, per preset shape."""
    import ray.cloudpickle as pickle

    from pdd_ray.experts.produce import ExpertJob, shared_fields
    from pdd_ray.experts.trajectory import Warmup
    from pdd_ray.training import TrainRecipe

    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    out = {}
    try:
        for name, (classes, ch, size, stages, ipc, experts) in PRESETS.items():
            n = classes * ipc * (stages - 1)  # the union S_<=P-1 that the last transition warms up on
            union = Warmup(torch.zeros(n, ch, size, size), torch.arange(n) % classes, TrainRecipe(epochs=300, lr=0.01))
            job = ExpertJob(key="k" * 16, index=0, seed=1, recipe=TrainRecipe(epochs=7, lr=0.01), keep_epochs=7,
                            meta={"stage": stages, "expert_index": 0}, init_from=("p" * 16, 0), warmup=union)
            inline = len(pickle.dumps(job))
            (stripped, refs), = shared_fields([job])
            ref_job = len(pickle.dumps(stripped)) + sum(len(pickle.dumps(r)) for r in refs.values())
            union_bytes = len(pickle.dumps(union))
            before, after = experts * inline, union_bytes + experts * ref_job
            out[name] = {"union_images": n, "union_mb": union_bytes / MB, "experts": experts,
                         "before_mb": before / MB, "after_mb": after / MB, "ratio": before / after}
            print(f"transition {name}: union {n} images {union_bytes / MB:.1f} MB x {experts} experts: "
                  f"{before / MB:,.1f} MB inline -> {after / MB:,.1f} MB shared ({before / after:.0f}x less)", flush=True)
            del union, job
    finally:
        ray.shutdown()
    return out


def _score(r: int) -> float:
    """One validation network: ConvNet width 32 trained 60 epochs on 100 digits-shaped images."""
    from pdd_ray.evaluation import StageSet, progressive_run
    from pdd_ray.modelspec import ModelSpec
    from pdd_ray.training import TrainRecipe

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 1, 8, 8, generator=g), torch.arange(200) % 10
    spec = ModelSpec("convnet", 1, 10, 8, width=32, depth=2)
    return progressive_run(spec, [StageSet(x[:100], y[:100], lr=0.01)], TrainRecipe(epochs=60, lr=0.01, batch_size=50),
                           {"val": (x[100:], y[100:])}, seed=100 + r)["val"][-1]


def _rank(rank: int, world: int, init: str, out: str, shared: bool) -> None:
    import torch.distributed as dist

    from pdd_ray.distill.stage import shared_mean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        busy = busy_cpu = 0.0

        def timed(r: int) -> float:
            nonlocal busy, busy_cpu
            t, c = time.perf_counter(), time.process_time()
            acc = _score(r)
            busy += time.perf_counter() - t
            busy_cpu += time.process_time() - c
            return acc

        _score(EVAL_RUNS)  # warm-up, untimed: a process's first network pays one-off costs (kernels, imports)
        dist.barrier()
        t0 = time.perf_counter()
        if shared:
            shared_mean(EVAL_RUNS, timed, torch.device("cpu"))
        else:  # before: rank 0 trains every network, the others wait in the next collective
            scores = torch.zeros(EVAL_RUNS, dtype=torch.float64)
            if rank == 0:
                for r in range(EVAL_RUNS):
                    scores[r] = timed(r)
            dist.all_reduce(scores)
        total = time.perf_counter() - t0
        Path(f"{out}.{rank}").write_text(json.dumps({"busy_s": busy, "busy_cpu_s": busy_cpu, "wait_s": total - busy,
                                                      "total_s": total}))
    finally:
        dist.destroy_process_group()


def validation_split() -> dict:
    import torch.multiprocessing as mp

    out = {}
    for world in (1, 2, 4):
        for shared in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                prefix = os.path.join(tmp, "r")
                mp.start_processes(_rank, args=(world, f"file://{tmp}/rdv", prefix, shared), nprocs=world, join=True,
                                   start_method="spawn")
                ranks = [json.loads(Path(f"{prefix}.{r}").read_text()) for r in range(world)]
            label = f"W={world} {'after (shared)' if shared else 'before (rank 0)'}"
            out[label] = ranks
            print(f"validation {label}: " + ", ".join(f"rank {r}: busy {d['busy_s']:.1f} s wait {d['wait_s']:.1f} s"
                                                     for r, d in enumerate(ranks)), flush=True)
    return out


def markdown(result: dict) -> str:
    lines = ["# Rehearsal of scale (part 1)", "", f"Machine: {result['machine']}.", "",
             "## Transition traffic (last transition of each preset, union S_<=P-1)", "",
             "| preset | union images | union MB | experts | inline MB (before) | shared MB (after) | less |",
             "|---|---|---|---|---|---|---|"]
    for name, t in result["transition"].items():
        lines.append(f"| {name} | {t['union_images']} | {t['union_mb']:.1f} | {t['experts']} | {t['before_mb']:,.1f} "
                     f"| {t['after_mb']:,.1f} | {t['ratio']:.0f}x |")
    lines += ["", f"## Validation: {EVAL_RUNS} networks per round, seconds per rank: busy / waiting wall (busy CPU)", "",
              "| workers | before: rank 0 validates | after: shared over ranks |", "|---|---|---|"]
    for world in (1, 2, 4):
        cells = []
        for shared in (False, True):
            ranks = result["validation"][f"W={world} {'after (shared)' if shared else 'before (rank 0)'}"]
            cells.append("; ".join(f"r{r} {d['busy_s']:.1f}/{d['wait_s']:.1f} ({d['busy_cpu_s']:.1f})"
                                   for r, d in enumerate(ranks)))
        lines.append(f"| {world} | {cells[0]} | {cells[1]} |")
    lines += ["", "Wall seconds busy / waiting per rank r. W = 4 runs 4 processes on 2 cores, and the machine",
              f"was shared (load average {result['load_average_start'][0]:.1f} at the start): busy wall seconds are",
              "inflated by contention; the CPU seconds in the JSON (`busy_cpu_s`) are not. What the table shows",
              "regardless of load is who trains and who waits."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = ap.parse_args(argv)
    result = {"benchmark": "scale rehearsal part 1", "command": " ".join(["python", *sys.argv]),
              "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}",
              "load_average_start": os.getloadavg(),
              "transition": transition_bytes(), "validation": validation_split()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from pdd_ray.atomic import write_text_atomic

    write_text_atomic(args.out, json.dumps(result, indent=2))
    md = args.out.with_suffix(".md")
    write_text_atomic(md, markdown(result))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
