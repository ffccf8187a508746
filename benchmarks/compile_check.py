"""Does ``torch.compile`` pay for pdd_ray's first-order trainings on this CPU? (issue 18, item 3)

Why: evaluation, baselines, in-loop validation, experts and transitions are many short plain
trainings of a small ConvNet (digits: 100 images, 300 epochs, one minibatch per epoch), each in a
Ray worker process. Compilation is paid per process; this measures it against the gain.

Prints the seconds of one evaluation-sized training: eager, compiled including compilation,
and compiled again in the same process (the compiled code cached), and writes them as JSON.

    python benchmarks/compile_check.py [--epochs 300] [--out benchmarks/results/compile_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdd_ray.atomic import write_text_atomic  # noqa: E402
from pdd_ray.modelspec import ModelSpec, build_seeded  # noqa: E402
from pdd_ray.seeding import generator  # noqa: E402
from pdd_ray.training import TrainRecipe, train  # noqa: E402


def timed(model: torch.nn.Module, recipe: TrainRecipe, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    t0 = time.perf_counter()
    train(model, x, y, recipe, generator(seed))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_check.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as an evaluation task (1 CPU) runs
    torch.manual_seed(0)
    x, y = torch.randn(100, 1, 8, 8), torch.arange(100) % 10
    spec = ModelSpec("convnet", 1, 10, 8, width=64, depth=2)
    recipe = TrainRecipe(epochs=args.epochs, lr=0.01, augment="crop_scale_rotate")
    out = {"epochs": args.epochs, "threads": 1, "torch": torch.__version__,
           "eager_s": timed(build_seeded(spec, 0), recipe, x, y, 0)}
    try:
        compiled = torch.compile(build_seeded(spec, 0))
        out["compiled_first_s"] = timed(compiled, recipe, x, y, 0)
        out["compiled_again_s"] = timed(compiled, recipe, x, y, 1)
    except Exception as exc:  # noqa: BLE001 - no compiler on this machine is a result too
        out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
