"""What the first optimiser of a fresh process costs: ``torch.optim.SGD`` against ``pdd_ray.sgd.SGD``.

Why: every ``torch.optim`` method is wrapped to keep TorchDynamo out, and its first call in a
process imports ``torch._dynamo``. pdd_ray trains in many fresh processes (each stage's Ray
Train worker, the expert and transition actors, the evaluation workers), so that import was paid
once per process before the first step. Each round starts two fresh interpreters, in turn, that
import torch and pdd_ray's training loop and then time their first optimiser construction and
step; the JSON keeps every round and the medians.

    python benchmarks/optimizer_import.py [--rounds 5] [--out benchmarks/results/optimizer_import.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdd_ray.atomic import write_text_atomic  # noqa: E402

_CHILD = """
import sys, time
import torch
import pdd_ray.training
from pdd_ray.sgd import SGD
model = torch.nn.Linear(8, 4)
model(torch.randn(2, 8)).sum().backward()
t0 = time.perf_counter()
opt = {kind}(model.parameters(), lr=0.1, momentum=0.9)
opt.step()
print(time.perf_counter() - t0, "torch._dynamo" in sys.modules)
"""

KINDS = {"torch.optim.SGD": "torch.optim.SGD", "pdd_ray.sgd.SGD": "SGD"}


def first_step_seconds(kind: str) -> tuple[float, bool]:
    """(seconds of the first construction and step, whether torch._dynamo got imported) in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _CHILD.format(kind=KINDS[kind])], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    seconds, dynamo = out.stdout.split()
    return float(seconds), dynamo == "True"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="fresh interpreters per kind, taken in turn (default 5)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/optimizer_import.json"))
    args = ap.parse_args(argv)
    rounds: dict[str, list[float]] = {k: [] for k in KINDS}
    dynamo: dict[str, bool] = {}
    for _ in range(args.rounds):
        for kind in KINDS:
            seconds, imported = first_step_seconds(kind)
            rounds[kind].append(seconds)
            dynamo[kind] = imported
    report = {"benchmark": "first optimiser construction and step in a fresh process", "rounds": rounds,
              "median_s": {k: statistics.median(v) for k, v in rounds.items()},
              "imports_torch_dynamo": dynamo, "date": time.strftime("%Y-%m-%d %H:%M")}
    for kind in KINDS:
        ms = [1000 * s for s in rounds[kind]]
        print(f"{kind:<16} first construction + step: median {statistics.median(ms):.1f} ms "
              f"(range {min(ms):.1f}-{max(ms):.1f} ms), imports torch._dynamo: {dynamo[kind]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
