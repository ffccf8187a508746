"""Projection of each paper preset's wall time and GPU memory on 1, 4 and 8 GPUs: a model, not a run.

Why: no GPU was available to this project while the cluster paths were built, yet a user needs
to know before renting one whether ``cifar100_ipc50`` fits a device and whether it takes hours
or weeks. This script measures on this CPU what does not depend on the device, at each preset's
real shapes, and combines it with the reference's compute model (``pdd-reference.md`` §14):

* measured (exact, device-independent): the FLOPs of one image's forward pass, of a training
  step per image (forward + backward), and of one inner step of the matching unroll per image
  (``pdd_ray.distill.match.match``: forward, first-order backward with a graph, and its share of
  the outer backward), counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matrix products only: DSA, normalisation and element-wise work are not counted); and the bytes
  the unroll's autograd graph keeps per image and inner step (``saved_tensors_hooks``, distinct
  storages), which sets the ``full`` unroll's memory;
* assumed (the model's parameters, printed with the table): an effective device throughput
  ``--tflops`` (default 10 TFLOP/s: a data-centre GPU's fp32/TF32 rate at the ~10-30 % use small
  ConvNets get) and a per-step latency floor ``--step-ms`` (default 1.5 ms for a training step,
  3x that for an unroll step: kernel launches bound small batches, not FLOPs).

The schedule is pdd_ray's: experts, transitions and evaluation runs are independent networks
spread over the G GPUs (fractional shares do not add FLOPs: throughput is the device's); a
stage's W = G Train workers each unroll their own trajectory, so a stage's iteration costs one
trajectory whatever G is (more GPUs average more trajectories per step, they do not shorten the
stage), and the in-loop validation's runs are shared over the ranks (ceil(runs / G) each).

    python benchmarks/projection.py [--tflops 10] [--step-ms 1.5] [--out benchmarks/results/projection.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdd_ray.augment import DiffAugment  # noqa: E402
from pdd_ray.config import load_config  # noqa: E402
from pdd_ray.distill.match import MatchProblem, UnrollSpec, match  # noqa: E402
from pdd_ray.distill.methods import method_class  # noqa: E402
from pdd_ray.experts.produce import matching_reach  # noqa: E402
from pdd_ray.models import FlatModel  # noqa: E402
from pdd_ray.modelspec import ModelSpec, build_seeded  # noqa: E402
from pdd_ray.seeding import generator  # noqa: E402

PRESETS = ("cifar10_ipc10", "cifar10_ipc50", "cifar100_ipc10", "cifar100_ipc50", "tiny_ipc10", "tiny_ipc50")
# dataset -> (training images before the validation split, classes, channels, image size)
DATASETS = {"cifar10": (50_000, 10, 3, 32), "cifar100": (50_000, 100, 3, 32), "tiny_imagenet": (100_000, 200, 3, 64)}
GPUS = (1, 4, 8)
GB = 1024**3


def _spec(cfg) -> ModelSpec:
    _, classes, channels, size = DATASETS[cfg.data.dataset]
    m = cfg.model
    return ModelSpec(m.arch, channels, classes, size, width=m.width, depth=m.depth, norm=m.norm, pooling=m.pooling)


def measure_shape(spec: ModelSpec, strategy: str) -> dict:
    """FLOPs per image (forward, training step, unroll step) and unroll graph bytes per image-step."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_seeded(spec, 0)
    x = torch.randn(4, spec.channels, spec.image_size, spec.image_size)
    y = torch.arange(4) % spec.num_classes
    with FlopCounterMode(display=False) as fc:
        net(x)
    fwd = fc.get_total_flops() / 4
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    train = fc.get_total_flops() / 4
    fm = FlatModel(net)
    start = fm.flatten()
    problem = MatchProblem(fm, start, start + 0.01 * torch.randn_like(start), x[:0], y[:0], x.clone().requires_grad_(),
                           y)
    alpha = torch.tensor(0.01, requires_grad=True)
    steps, batch = 2, 4
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        match(problem, alpha, UnrollSpec(steps, batch, DiffAugment(strategy), "full"), generator(0))
    params_bytes = 4 * start.numel()
    graph = max(0, sum(seen.values()) - steps * params_bytes) / (steps * batch)
    return {"forward_flops": fwd, "train_step_flops": train, "unroll_step_flops": fc.get_total_flops() / (steps * batch),
            "unroll_graph_bytes": graph, "params": start.numel()}


def _seconds(flops: float, steps: float, tflops: float, floor_s: float) -> float:
    """A phase's seconds on one device: FLOP-bound or launch-bound, whichever is slower."""
    return max(flops / (tflops * 1e12), steps * floor_s)


def project(name: str, shape: dict, tflops: float, step_ms: float) -> dict:
    """Wall time per phase on 1, 4 and 8 GPUs and the stage worker's peak unroll memory."""
    cfg = load_config(name, [])
    n_full, classes, _, _ = DATASETS[cfg.data.dataset]
    n_train = int(n_full * (1 - cfg.data.val_fraction))
    d, e, ev = cfg.distill, cfg.experts, cfg.evaluation
    floor = step_ms / 1e3
    steps_per_epoch = lambda n, b: math.ceil(n / b)  # noqa: E731
    union = [classes * d.ipc_per_stage * k for k in range(1, d.num_stages + 1)]
    batch_syn = method_class(d.method).stage_params(cfg, classes, 1)["batch_syn"]
    train, unroll = shape["train_step_flops"], shape["unroll_step_flops"]
    reach = matching_reach(cfg) + 1
    # one device's seconds for each independent unit of work
    expert = _seconds(e.epochs * n_train * train, e.epochs * steps_per_epoch(n_train, e.batch_size), tflops, floor)
    trajectory_iter = _seconds(d.syn_steps * batch_syn * unroll, d.syn_steps, tflops, 3 * floor)
    rounds = d.iterations // d.eval_every + 1
    val_net = [_seconds(d.eval_epochs * u * train, d.eval_epochs * steps_per_epoch(u, ev.batch_size), tflops, floor)
               for u in union]
    trans_net = [_seconds((d.transition_syn_epochs * u + reach * n_train) * train,
                          d.transition_syn_epochs * steps_per_epoch(u, ev.batch_size)
                          + reach * steps_per_epoch(n_train, e.batch_size), tflops, floor) for u in union[:-1]]
    eval_net = sum(_seconds(ev.epochs_per_stage * u * train, ev.epochs_per_stage * steps_per_epoch(u, ev.batch_size),
                            tflops, floor) for u in union)
    n_trans = d.transition_experts or e.num_experts
    out = {"preset": name, "batch_syn": batch_syn, "syn_steps": d.syn_steps, "iterations": d.iterations,
           "stages": d.num_stages, "union_final": union[-1],
           "memory_full_gb": (d.syn_steps * batch_syn * shape["unroll_graph_bytes"]
                              + d.syn_steps * 4 * shape["params"]) / GB,
           "memory_checkpoint_gb": (batch_syn * shape["unroll_graph_bytes"] + d.syn_steps * 4 * shape["params"]) / GB,
           "hours": {}}
    for g in GPUS:
        phases = {
            "experts": math.ceil(e.num_experts / g) * expert,
            "stages": d.num_stages * d.iterations * trajectory_iter,
            "validation": sum(rounds * math.ceil(d.eval_runs / g) * v for v in val_net),
            "transitions": sum(math.ceil(n_trans / g) * t for t in trans_net),
            "evaluation": math.ceil(ev.runs / g) * eval_net,
        }
        out["hours"][g] = {k: v / 3600 for k, v in phases.items()} | {"total": sum(phases.values()) / 3600}
    return out


def markdown(result: dict) -> str:
    a = result["assumptions"]
    lines = [
        "# Projection of the paper presets on 1, 4 and 8 GPUs (a model, not a measurement)", "",
        f"Assumed effective throughput {a['tflops']} TFLOP/s per GPU, per-step floor {a['step_ms']} ms "
        f"(unroll steps 3x). FLOPs and graph bytes per image measured on this CPU at each preset's shapes "
        "(convolutions and matrix products only). Hours per phase; stage memory is one worker's unroll graph.", "",
        "| preset | batch_syn x steps | full unroll GB | checkpoint GB | GPUs | experts | stages | validation "
        "| transitions | evaluation | total h |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["presets"]:
        for g, h in p["hours"].items():
            lines.append(f"| {p['preset']} | {p['batch_syn']} x {p['syn_steps']} | {p['memory_full_gb']:.1f} | "
                         f"{p['memory_checkpoint_gb']:.2f} | {g} | {h['experts']:.1f} | {h['stages']:.1f} | "
                         f"{h['validation']:.1f} | {h['transitions']:.1f} | {h['evaluation']:.1f} | {h['total']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tflops", type=float, default=10.0, help="effective TFLOP/s per GPU (assumption)")
    ap.add_argument("--step-ms", type=float, default=1.5, help="per-training-step latency floor in ms (assumption)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shapes: dict[str, dict] = {}
    presets = []
    for name in PRESETS:
        cfg = load_config(name, [])
        spec = _spec(cfg)
        key = f"{spec.num_classes}x{spec.channels}x{spec.image_size} w{spec.width} d{spec.depth}"
        if key not in shapes:
            shapes[key] = measure_shape(spec, cfg.augment.strategy)
            print(f"{key}: {json.dumps({k: round(v) for k, v in shapes[key].items()})}", flush=True)
        presets.append(project(name, shapes[key], args.tflops, args.step_ms))
    result = {"machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
              "assumptions": {"tflops": args.tflops, "step_ms": args.step_ms}, "measured_per_image": shapes,
              "presets": presets}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
