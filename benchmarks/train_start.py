"""What Ray Train costs a one-worker stage before and after its loop: an empty ``fit()``,
``TorchTrainer`` against the plain data-parallel trainer a one-worker stage now gets.

Why: every stage is one ``fit()``, and with an empty loop that took 10-14 s on this 2-core
machine, twice per default run. ``TorchTrainer`` makes its controller import torch (for
``TorchConfig``) and its worker join a gloo process group, which a single worker never uses.
The two kinds alternate in one Ray session (a slow minute of this VM hits both), with the
stage's own settings (1 worker, 2 CPUs, the 0.25 s health poll pdd_ray sets). Seconds are
from just before ``fit()`` to its return, and to the loop's first line (written to a file,
since Train v2 keeps no metrics without a checkpoint).

    python benchmarks/train_start.py [--rounds 5] [--out benchmarks/results/train_start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdd_ray.distill.launch import _solo_trainer_class  # noqa: E402


def _loop(config: dict) -> None:
    Path(config["mark"]).write_text(str(time.time()))


def _fit(kind: str, folder: Path, i: int) -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    mark = folder / f"mark_{i}"
    common = dict(train_loop_config={"mark": str(mark)},
                  scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                  run_config=RunConfig(name=f"{kind}_{i}", storage_path=str(folder / "train")))
    trainer = TorchTrainer(_loop, **common) if kind == "torch" else _solo_trainer_class()(_loop, **common)
    t0 = time.time()
    trainer.fit()
    return float(mark.read_text()) - t0, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fits of each kind, alternating")
    parser.add_argument("--out", default="benchmarks/results/train_start.json")
    args = parser.parse_args()

    import ray

    from pdd_ray.atomic import write_text_atomic
    from pdd_ray.runtime import ensure_ray

    if _solo_trainer_class() is None:
        raise SystemExit("this Ray has no Train v2 DataParallelTrainer: nothing to compare")
    ensure_ray(num_cpus=2)  # the CLI's local instance and Train settings
    rows: dict[str, list[dict]] = {"torch": [], "solo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2 * args.rounds):
            kind = "torch" if i % 2 == 0 else "solo"
            first, total = _fit(kind, Path(tmp), i)
            rows[kind].append({"to_first_line_s": round(first, 2), "fit_s": round(total, 2)})
            print(f"{kind:5s} fit {total:5.2f} s (loop's first line after {first:5.2f} s)", flush=True)
    ray.shutdown()
    summary = {kind: {"median_fit_s": statistics.median(r["fit_s"] for r in runs),
                      "min_fit_s": min(r["fit_s"] for r in runs), "max_fit_s": max(r["fit_s"] for r in runs)}
               for kind, runs in rows.items()}
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "cpus": os.cpu_count(),
              "runs": rows, "summary": summary}
    for kind, s in summary.items():
        print(f"{kind:5s} median {s['median_fit_s']:.2f} s (range {s['min_fit_s']:.2f}-{s['max_fit_s']:.2f})")
    write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
