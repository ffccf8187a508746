"""Where one outer matching iteration spends the host's time: pdd_ray's ``full`` unroll beside
the official-style step (``official_step.py``), with ``torch.profiler``.

Why: on a GPU the digits-sized step is bound by the host (its CPU seconds equal its wall
seconds: kernels are tiny and the Python/launch path is the cost), and there pdd_ray's step
was 1.40x the official one (H200, ``benchmarks/results/gpu_speed_h200.md``) while on this
CPU it is about even. Counting the aten operators, the CUDA runtime calls (kernel launches,
copies, synchronisations) and the operators with the most host time, per iteration, says
which part of the step to make leaner. Runs on CPU too (no CUDA rows then).

    python benchmarks/step_profile.py [--shape digits] [--images 20] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import speed  # noqa: E402 - the benchmark's own builders of both steps

from pdd_ray.atomic import write_text_atomic  # noqa: E402

CUDA_CALLS = ("cudaLaunchKernel", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaMemsetAsync", "cudaEventRecord", "cuLaunchKernel", "cudaLaunchKernelExC")


def profile_step(unroll: str, shape: str, images: int, steps: int, device: torch.device, top: int,
                 by_shape: bool = False) -> dict:
    """Profile one iteration after two warm-ups; counts and the top operators by self host time
    (with ``by_shape``, per operator and input shapes, to tell apart calls of one operator)."""
    setting = speed.Setting(shape, images, steps, unroll)
    once, _ = (speed._official_once if unroll == "official" else speed._ours_once)(setting, device)
    for seed in (0, 1):
        once(steps, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=by_shape) as prof:
        once(steps, 2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    calls = collections.Counter({e.key: e.count for e in averages})
    shaped = prof.key_averages(group_by_input_shape=True) if by_shape else averages
    aten = sum(c for k, c in calls.items() if k.startswith("aten::"))
    runtime = {k: calls[k] for k in CUDA_CALLS if calls.get(k)}
    by_self = sorted((e for e in shaped if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return {
        "unroll": unroll,
        "aten_calls": aten,
        "cuda_runtime_calls": runtime,
        "host_ms_total": sum(e.self_cpu_time_total for e in averages) / 1000,
        "top_self_host_ms": [{"op": e.key + (f" {e.input_shapes}" if by_shape else ""), "calls": e.count,
                              "self_host_ms": round(e.self_cpu_time_total / 1000, 2)} for e in by_self[:top]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="digits", choices=sorted(speed.SHAPES))
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--by-shape", action="store_true", help="group operators by input shapes too")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/step_profile.json"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [profile_step(u, args.shape, args.images, args.steps, device, args.top, args.by_shape)
            for u in ("official", "full")]
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": args.shape, "images": args.images, "steps": args.steps, "steps_profiled": rows}
    for r in rows:
        print(f"{r['unroll']}: {r['aten_calls']} aten calls, host {r['host_ms_total']:.1f} ms, CUDA {r['cuda_runtime_calls']}")
        for t in r["top_self_host_ms"]:
            print(f"    {t['op'][:110]:110s} {t['calls']:6d} calls {t['self_host_ms']:8.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
