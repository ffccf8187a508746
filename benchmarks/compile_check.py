"""Does ``torch.compile`` pay for pdd_ray's first-order trainings on this CPU? (issue 18, item 3)

Why: evaluation, baselines, in-loop validation, experts and transitions are many short plain
trainings of a small ConvNet (digits: 100 images, 300 epochs, one minibatch per epoch), each in a
Ray worker process. Compilation is paid per process; this measures it against the gain.

Prints the seconds of one evaluation-sized training: eager, compiled including compilation,
and compiled again in the same process (the compiled code cached), and writes them as JSON.

``--step ANCHOR`` measures the matching step instead (issue 18, item 1): one outer iteration of
the full unroll at speed anchor a, b or c (``benchmarks/speed.py``), eager as ``match`` runs it,
against the same unroll with each inner step's gradient ∇_w CE(f(w, x)) computed by
``torch.compile(torch.func.grad(...))``; AOTAutograd then also compiles that function's backward,
the double backward the outer gradient needs. Both run in one process, 2 threads, and print
the median seconds and how far the compiled gradients are from the eager ones.

    python benchmarks/compile_check.py [--epochs 300] [--out benchmarks/results/compile_check.json]
    python benchmarks/compile_check.py --step c --repeats 15 --out benchmarks/results/compile_step_c.json
    python benchmarks/compile_check.py --step b --repeats 5 --out benchmarks/results/compile_step_b.json
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


def step_check(anchor: str, repeats: int) -> dict:
    """Eager against compiled inner-step gradients in the full unroll, at speed anchor ``anchor`` (a, b or c)."""
    import statistics

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import ANCHORS, SHAPES, STRATEGY

    from pdd_ray.allocator import keep_freed_memory
    from pdd_ray.augment import DiffAugment
    from pdd_ray.distill.match import _device_schedule
    from pdd_ray.models import FlatModel

    keep_freed_memory()  # as speed.py's anchors and the stage workers run
    torch.set_num_threads(2)
    name = next(k for k in ANCHORS if k.startswith(f"{anchor}:"))
    shape, images, steps, _, _ = ANCHORS[name]
    channels, size, width, depth = SHAPES[shape]
    fm = FlatModel(build_seeded(ModelSpec("convnet", channels, 10, size, width=width, depth=depth), 0))
    torch.manual_seed(0)
    start = fm.flatten()
    target = start + 0.01 * torch.randn_like(start)
    x0 = torch.randn(images, channels, size, size, requires_grad=True)
    y0 = torch.arange(images) % 10
    alpha = torch.tensor(0.01, requires_grad=True)
    dsa = DiffAugment(STRATEGY)

    def ce(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(fm(w, x), y)

    compiled_grad = torch.compile(torch.func.grad(ce), dynamic=False)

    def iteration(seed: int, compiled: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        g = generator(seed)
        w = start.clone().requires_grad_(True)
        for idx in _device_schedule(images, images, steps, g, x0.device):
            x = dsa(x0[idx], generator=g)
            if compiled:
                grad = compiled_grad(w, x, y0[idx])
            else:
                (grad,) = torch.autograd.grad(ce(w, x, y0[idx]), w, create_graph=True)
            w = w - alpha * grad
        loss = ((w - target) ** 2).sum() / ((start - target) ** 2).sum()
        gx, ga = torch.autograd.grad(loss, [x0, alpha])
        return float(loss.detach()), gx, ga

    out: dict = {"anchor": name, "threads": 2, "torch": torch.__version__, "repeats": repeats}
    t0 = time.perf_counter()
    _, gx_c, ga_c = iteration(0, compiled=True)
    out["compiled_first_s"] = time.perf_counter() - t0
    _, gx_e, ga_e = iteration(0, compiled=False)
    out["max_abs_diff_grad_images"] = float((gx_c - gx_e).abs().max())
    out["grad_images_norm"] = float(gx_e.norm())
    out["grad_alpha_eager_compiled"] = [float(ga_e), float(ga_c)]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(repeats):  # alternated, so a slow minute hits both
        for mode in ("eager", "compiled"):
            t0 = time.perf_counter()
            iteration(10 + r, compiled=mode == "compiled")
            times[mode].append(time.perf_counter() - t0)
    out["eager_s"] = statistics.median(times["eager"])
    out["compiled_s"] = statistics.median(times["compiled"])
    out["compiled_over_eager"] = out["compiled_s"] / out["eager_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_check.json"))
    ap.add_argument("--step", choices=("a", "b", "c"), default=None,
                    help="measure the matching step at this speed anchor instead (see the docstring)")
    ap.add_argument("--repeats", type=int, default=7, help="--step: timed iterations per variant")
    args = ap.parse_args(argv)
    if args.step is not None:
        out = step_check(args.step, args.repeats)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
        return 0
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
