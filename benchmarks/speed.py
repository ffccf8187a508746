"""Cost of one trajectory-matching outer iteration (``pdd_ray.distill.match.match``) by unroll mode.

Why: the full second-order unroll keeps every inner step's graph, so its memory grows with
``syn_steps`` × images, which is what stops CIFAR-size settings on a laptop; "checkpoint"
(exact) and "tesla" (approximate) bound it. This script measures the trade: seconds per outer
iteration (median over repeats, after a short warm-up) and peak memory, per setting.

Settings: CIFAR-10 shape (3x32x32, ConvNet width 128 depth 3) and digits shape (1x8x8, width
64 depth 2), 10 classes, random tensors (no dataset), all images new (plain MTT, as the
official measurements), minibatch = all images, DSA on (MTT's default strategy), grid of
syn_steps 10/20/50 × images 10/100 × unroll, plus three "official anchor" settings that the
official PDD code was timed on with this CPU.

"official" is the same iteration done the official code's way (``benchmarks/official_step.py``:
module-swap flat parameters, its DSA, ``backward()``), timed here beside pdd_ray so the ratio
does not depend on the day's machine state; with ``--rounds R`` every setting runs in R
separate processes taken in turn (official, full, official, full, ...), so a slow minute
affects both sides alike. pdd_ray's runs apply ``pdd_ray.allocator`` as its workers do (the
official code keeps glibc's defaults); ``--default-malloc`` leaves it off to show its share.

``--ks 1,2,4,8`` adds the K-trajectories-per-worker sweep (``match_many``, full unroll): seconds
per iteration and per trajectory at digits and CIFAR-10 shapes (20 images, 20 steps).

Memory: each setting runs in a fresh spawned process. On CPU the peak is ``ru_maxrss``
(reported both as the whole-process peak, comparable with the official numbers, and as the
increase over the baseline taken after model and data construction); on CUDA it is
``torch.cuda.max_memory_allocated`` (above the baseline). A setting whose estimated peak
exceeds ``--mem-limit-gb`` (default 6 on CPU) is skipped and recorded as such unless
``--allow-large``: the estimate is image-steps × per-image-step footprint for "full" and one
step's worth for the stored modes, the footprint calibrated from the smallest "full" run of
each shape (which is always run first and is tiny).

    python benchmarks/speed.py [--quick] [--threads N] [--out benchmarks/results/speed.json]
    python benchmarks/speed.py --anchors-only --unrolls official,full --rounds 3 --repeats 1 --threads 2 --ks 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GB = 1024**3
UNROLL_MODES = ("full", "checkpoint", "tesla", "official")  # "official": benchmarks/official_step.py
K_SHAPES = (("digits", 20, 20), ("cifar10", 20, 20))  # (shape, images, syn_steps) of the K sweep
STRATEGY = "color_crop_cutout_flip_scale_rotate"
SAFETY = 1.25  # margin on extrapolated memory estimates: the guard must err towards skipping

# shape name -> (channels, image size, ConvNet width, depth)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "cifar10": (3, 32, 128, 3),
    "digits": (1, 8, 64, 2),
}

# name -> (shape, images, syn_steps, official seconds, official GB): the official PDD code on this CPU
ANCHORS: dict[str, tuple[str, int, int, float, float]] = {
    "a: cifar10 100 img 20 steps": ("cifar10", 100, 20, 25.6, 6.8),
    "b: cifar10 20 img 50 steps": ("cifar10", 20, 50, 7.85, 4.0),
    "c: digits 20 img 20 steps": ("digits", 20, 20, 0.21, 0.84),
}


@dataclass(frozen=True)
class Setting:
    """One measured configuration; ``images`` is also the synthetic minibatch (all of them)."""

    shape: str
    images: int
    syn_steps: int
    unroll: str
    k: int = 1  # trajectories per iteration (match_many)

    @property
    def key(self) -> str:
        return f"{self.shape}/{self.images}img/{self.syn_steps}steps/{self.unroll}" + (f"/K{self.k}" if self.k > 1 else "")


def write_text(path: Path, text: str) -> None:
    """Atomic write (:func:`pdd_ray.atomic.write_text_atomic`)."""
    from pdd_ray.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2))


def _rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _official_once(setting: Setting, device: torch.device):
    """The official-style iteration as ``once(steps, seed)``, and its parameter count."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from official_step import Reparam, build_convnet, official_iteration

    channels, size, width, depth = SHAPES[setting.shape]
    torch.manual_seed(0)
    net = Reparam(build_convnet(channels, size, width, depth).to(device))
    start = net.flat0.to(device)
    target = start + 0.01 * torch.randn_like(start)
    x = torch.randn(setting.images, channels, size, size, device=device, requires_grad=True)
    y = (torch.arange(setting.images) % 10).to(device)
    lr = torch.tensor(0.01, device=device, requires_grad=True)

    def once(steps: int, seed: int) -> float:
        torch.manual_seed(seed)
        return official_iteration(net, start, target, x, y, lr, steps, setting.images)

    return once, start.numel()


def _ours_once(setting: Setting, device: torch.device):
    """pdd_ray's iteration (``match``, or ``match_many`` for K > 1) as ``once(steps, seed)``."""
    from pdd_ray.augment import DiffAugment
    from pdd_ray.distill.match import MatchProblem, UnrollSpec, match, match_many
    from pdd_ray.models import FlatModel
    from pdd_ray.modelspec import ModelSpec, build_seeded
    from pdd_ray.seeding import generator

    channels, size, width, depth = SHAPES[setting.shape]
    fm = FlatModel(build_seeded(ModelSpec("convnet", channels, 10, size, width=width, depth=depth), 0).to(device))
    torch.manual_seed(0)
    starts = [fm.flatten().to(device) + 0.01 * j for j in range(setting.k)]
    targets = [s + 0.01 * torch.randn_like(s) for s in starts]
    no_x = torch.zeros(0, channels, size, size, device=device)
    no_y = torch.zeros(0, dtype=torch.long, device=device)
    new_x = torch.randn(setting.images, channels, size, size, device=device, requires_grad=True)
    new_y = (torch.arange(setting.images) % 10).to(device)
    alpha = torch.tensor(0.01, device=device, requires_grad=True)
    dsa = DiffAugment(STRATEGY)
    problems = [MatchProblem(fm, s, t, no_x, no_y, new_x, new_y) for s, t in zip(starts, targets)]

    def once(steps: int, seed: int) -> float:
        spec = UnrollSpec(steps, setting.images, dsa, setting.unroll)
        if setting.k == 1:
            return match(problems[0], alpha, spec, generator(seed)).loss
        return match_many(problems, alpha, spec, [generator(seed * 100 + j) for j in range(setting.k)]).loss

    return once, fm.numel


def _measure(setting: Setting, repeats: int, budget_s: float, threads: int | None, default_malloc: bool) -> dict:
    """Runs inside the spawned child: build, warm up, time one iteration and read the peak memory."""
    from pdd_ray.allocator import keep_freed_memory
    from pdd_ray.device import pick_device

    if threads:
        torch.set_num_threads(threads)
    # pdd_ray's processes keep freed memory (pdd_ray/allocator.py); the official code does not
    malloc_kept = setting.unroll != "official" and not default_malloc and keep_freed_memory()
    device = pick_device(torch.cuda.is_available())
    cuda = device.type == "cuda"
    iteration, numel = (_official_once if setting.unroll == "official" else _ours_once)(setting, device)

    def once(steps: int, seed: int) -> tuple[float, float, float]:
        """Wall seconds, CPU seconds of this process (robust to other load), loss."""
        t0, c0 = time.perf_counter(), time.process_time()
        loss = iteration(steps, seed)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0, loss

    # Baseline after model and data construction, before any unroll: the warm-up's own
    # high-water mark must count, or the CPU peak (a high-water mark too) is under-reported.
    base = torch.cuda.memory_allocated(device) if cuda else _rss_bytes()
    # Warm-up: one whole iteration, so the timed ones are a long stage's steady state (kernels
    # primed, and with pdd_ray.allocator the heap already grown to an iteration's peak: the first
    # iteration at CIFAR-10 shape, 100 images, costs ~34 s, the following ones ~23 s).
    once(setting.syn_steps, 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    cpu_times: list[float] = []
    loss = float("nan")
    while len(times) < repeats and (not times or sum(times) < budget_s):
        dt, dc, loss = once(setting.syn_steps, 1 + len(times))
        times.append(dt)
        cpu_times.append(dc)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_bytes()
    return {
        "status": "ok",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds": statistics.median(times),
        "seconds_all": times,
        "cpu_seconds": statistics.median(cpu_times),
        "peak_delta_gb": (peak - base) / GB,
        "peak_process_gb": None if cuda else peak / GB,
        "loss": loss,
        "params": numel,
        "malloc_kept": malloc_kept,
    }


def _child(setting: Setting, repeats: int, budget_s: float, threads: int | None, default_malloc: bool,
           out: mp.Queue) -> None:
    try:
        out.put(_measure(setting, repeats, budget_s, threads, default_malloc))
    except Exception as exc:  # reported, not raised: one failing setting must not lose the rest
        out.put({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})


def run_isolated(setting: Setting, repeats: int, budget_s: float, threads: int | None,
                 default_malloc: bool = False) -> dict:
    """``_measure`` in a fresh spawned process, so its peak memory is this setting's alone."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(setting, repeats, budget_s, threads, default_malloc, out))
    proc.start()
    result: dict | None = None
    while result is None:
        try:
            result = out.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                break
    proc.join()
    if result is None:
        return {"status": "error", "reason": f"child exited with status {proc.exitcode} (killed for memory?)"}
    return result


def grid(quick: bool, unrolls: tuple[str, ...], anchors_only: bool = False,
         ks: tuple[int, ...] = ()) -> tuple[list[Setting], dict[str, list[Setting]]]:
    """The grid, the K sweep and the anchors (anchors reuse grid runs with the same key)."""
    steps, images = ((10,), (10,)) if quick else ((10, 20, 50), (10, 100))
    shapes = ("digits", "cifar10")
    settings = [] if anchors_only else [Setting(s, n, k, u) for s in shapes for n in images for k in steps for u in unrolls]
    settings += [Setting(shape, n, steps_, "full", k) for shape, n, steps_ in K_SHAPES for k in ks
                 if not (quick and shape != "digits")]
    anchors: dict[str, list[Setting]] = {}
    for name, (shape, n, k, _, _) in ANCHORS.items():
        if quick and shape != "digits":
            continue
        anchors[name] = [Setting(shape, n, k, u) for u in unrolls]
    return settings, anchors


def estimate_gb(s: Setting, footprint: dict[str, float], params: dict[str, int]) -> float | None:
    """Expected peak increase: image-steps × footprint for "full"; for the stored modes about
    two steps' worth (the replayed step plus its double-backward) plus the stored weights.
    Padded by ``SAFETY`` because it is extrapolated from one small calibration run."""
    if s.shape not in footprint:
        return None
    per = footprint[s.shape]
    if s.unroll in ("full", "official"):
        return SAFETY * s.syn_steps * s.images * per * s.k
    return SAFETY * (2 * s.images * per + s.syn_steps * params.get(s.shape, 0) * 4 / GB)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke subset: 10 images, 10 steps, digits anchor, one timed iteration each")
    ap.add_argument("--anchors-only", action="store_true",
                    help="only the three settings the official code was timed on (platform notes)")
    ap.add_argument("--unrolls", default=",".join(UNROLL_MODES), help="comma-separated modes (default all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations per setting (default 3)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="stop repeating a setting once its timed iterations took this long (default 60)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); use 1 on a busy machine, where "
                         "oversubscribed OpenMP threads spin and distort timings many-fold")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="skip settings estimated above this (default 6 on CPU, 80%% of GPU memory on CUDA)")
    ap.add_argument("--allow-large", action="store_true", help="run settings above the memory limit too")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every setting in this many separate processes, taking the settings in turn "
                         "(median over all of them); 3 with --repeats 1 makes official/ours ratios robust to drift")
    ap.add_argument("--ks", default="", help="K sweep of match_many, e.g. 1,2,4,8 (default: none)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator settings alone in pdd_ray's runs too (pdd_ray.allocator off)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    unrolls = tuple(u.strip() for u in args.unrolls.split(",") if u.strip())
    bad = [u for u in unrolls if u not in UNROLL_MODES]
    if bad or not unrolls or args.repeats < 1 or args.rounds < 1:
        ap.error(f"--unrolls {args.unrolls!r} / --repeats {args.repeats} / --rounds {args.rounds}: "
                 f"modes from {UNROLL_MODES}, repeats and rounds >= 1")
    try:
        ks = tuple(int(k) for k in args.ks.split(",") if k.strip())
    except ValueError:
        ap.error(f"--ks {args.ks!r}: comma-separated integers >= 1, e.g. 1,2,4,8")
    if any(k < 1 for k in ks):
        ap.error(f"--ks {args.ks!r}: comma-separated integers >= 1, e.g. 1,2,4,8")

    cuda = torch.cuda.is_available()
    limit = args.mem_limit_gb
    if limit is None:
        limit = 0.8 * torch.cuda.get_device_properties(0).total_memory / GB if cuda else 6.0
    settings, anchors = grid(args.quick, unrolls, args.anchors_only, ks)
    todo: list[Setting] = []
    for s in [*settings, *(s for group in anchors.values() for s in group)]:
        if s not in todo:
            todo.append(s)
    # calibration first: the smallest run of each shape ("full" if asked for) sets the footprint
    todo.sort(key=lambda s: (s.unroll != "full", s.k, s.syn_steps * s.images))

    footprint: dict[str, float] = {}
    params: dict[str, int] = {}
    results: dict[str, dict] = {}
    meta = {
        "benchmark": "mtt.match seconds per outer iteration and peak memory by unroll mode",
        "command": " ".join(["python", *sys.argv]),
        "device": f"cuda: {torch.cuda.get_device_name(0)}" if cuda else "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
        "memory_limit_gb": limit,
        "dsa": STRATEGY,
        "rounds": args.rounds,
        "default_malloc": args.default_malloc,
    }
    started = time.time()
    for round_ in range(args.rounds):
        for s in todo:
            est = estimate_gb(s, footprint, params)
            if round_ and results[s.key]["status"] != "ok":
                continue
            if est is not None and est > limit and not args.allow_large:
                res = {"status": "skipped", "reason": f"estimated {est:.1f} GB > limit {limit:.1f} GB (--allow-large runs it)"}
            else:
                print(f"[{time.time() - started:6.0f}s] round {round_ + 1}/{args.rounds} {s.key} ...", file=sys.stderr, flush=True)
                res = run_isolated(s, args.repeats, args.budget_s, args.threads, args.default_malloc)
            results[s.key] = _merge(results.get(s.key), {**asdict(s), "estimate_gb": est, **res})
            if res["status"] == "ok" and s.shape not in footprint:
                # "full" holds every image-step's graph; the stored modes about two steps' worth
                image_steps = s.syn_steps * s.images * s.k if s.unroll in ("full", "official") else 2 * s.images
                footprint[s.shape] = max(res["peak_delta_gb"], 1e-6) / image_steps
                params[s.shape] = res["params"]
            print(f"          {res['status']} {res.get('seconds', '')} {res.get('reason', '')}", file=sys.stderr, flush=True)
            # written after every setting, so an interrupted long run keeps what it measured
            done = round_ == args.rounds - 1 and s == todo[-1]
            report = build_report(meta, results, anchors, footprint, started, complete=done)
            write_json(args.out, report)
    table = markdown(report)
    write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def _merge(old: dict | None, new: dict) -> dict:
    """One setting's result over rounds: all timed iterations pooled, medians over them, the
    highest memory peak; a failed later round keeps the earlier numbers and says so."""
    if old is None or old["status"] != "ok":
        return new
    if new["status"] != "ok":
        return {**old, "note": f"a later round: {new['status']} {new.get('reason', '')}"}
    seconds = old["seconds_all"] + new["seconds_all"]
    cpu = old.get("cpu_all", [old["cpu_seconds"]]) + [new["cpu_seconds"]]
    return {**new, "seconds_all": seconds, "seconds": statistics.median(seconds), "cpu_all": cpu,
            "cpu_seconds": statistics.median(cpu), "peak_delta_gb": max(old["peak_delta_gb"], new["peak_delta_gb"]),
            "peak_process_gb": None if new["peak_process_gb"] is None else max(old["peak_process_gb"], new["peak_process_gb"])}


def build_report(meta: dict, results: dict[str, dict], anchors: dict[str, list[Setting]],
                 footprint: dict[str, float], started: float, complete: bool) -> dict:
    """The JSON document: metadata, every setting's result, and the anchors beside the official numbers."""
    pending = {"status": "pending"}
    return {
        **meta,
        "complete": complete,
        "load_average_end": os.getloadavg(),
        "wall_seconds": time.time() - started,
        "footprint_gb_per_image_step": footprint,
        "results": list(results.values()),
        "anchors": {
            name: {
                "official_seconds": ANCHORS[name][3],
                "official_gb": ANCHORS[name][4],
                "ours": {s.unroll: results.get(s.key, pending) for s in group},
            }
            for name, group in anchors.items()
        },
    }



def _cell(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    mem = r["peak_process_gb"] if r["peak_process_gb"] is not None else r["peak_delta_gb"]
    return f"{r['seconds']:.2f} s / {mem:.2f} GB"


def markdown(report: dict) -> str:
    """The grid and the anchors as markdown tables (memory: whole-process peak on CPU)."""
    lines = [
        f"device {report['device']}, {report['threads']} threads, torch {report['torch']}, "
        f"1-min load average {report['load_average_start'][0]:.1f} at start, "
        f"{report['load_average_end'][0]:.1f} at end",
        "",
        "| shape | images | steps | unroll | s/iter (median) | CPU s/iter | peak Δ GB | process peak GB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["results"], key=lambda r: (r["shape"], r["images"], r["syn_steps"], UNROLL_MODES.index(r["unroll"]), r.get("k", 1))):
        if r.get("k", 1) > 1:
            continue  # in the K table
        if r["status"] == "ok":
            proc = "" if r["peak_process_gb"] is None else f"{r['peak_process_gb']:.2f}"
            lines.append(f"| {r['shape']} | {r['images']} | {r['syn_steps']} | {r['unroll']} | {r['seconds']:.3f} "
                         f"| {r['cpu_seconds']:.3f} | {r['peak_delta_gb']:.2f} | {proc} | {len(r['seconds_all'])} timed |")
        else:
            lines.append(f"| {r['shape']} | {r['images']} | {r['syn_steps']} | {r['unroll']} | – | – | – | – "
                         f"| {r['status']}: {r.get('reason', '')} |")
    modes = sorted({u for a in report["anchors"].values() for u in a["ours"]}, key=UNROLL_MODES.index)
    here = "official" in modes
    lines += ["", "| anchor | official, platform notes | " + " | ".join(modes)
              + (" | full ÷ official (measured here) |" if here else " |"), "|---" * (2 + len(modes) + here) + "|"]
    for name, a in report["anchors"].items():
        cells = [_cell(a["ours"][m]) for m in modes]
        if here:
            off, full = a["ours"]["official"], a["ours"].get("full", {"status": "missing"})
            ok = off["status"] == "ok" and full["status"] == "ok"
            cells.append(f"**{full['seconds'] / off['seconds']:.2f}**" if ok else "–")
        lines.append(f"| {name} | {a['official_seconds']} s / {a['official_gb']} GB | " + " | ".join(cells) + " |")
    ks = sorted((r for r in report["results"] if r["unroll"] == "full" and r["status"] == "ok"
                 and any(r["shape"] == s and r["images"] == n and r["syn_steps"] == t for s, n, t in K_SHAPES)),
                key=lambda r: (r["shape"], r.get("k", 1)))
    if any(r.get("k", 1) > 1 for r in ks):
        lines += ["", "K trajectories per worker (match_many, full unroll, 20 images, 20 steps):", "",
                  "| shape | K | s/iteration | s/trajectory | vs K=1 | peak Δ GB |", "|---|---|---|---|---|---|"]
        base = {r["shape"]: r["seconds"] for r in ks if r.get("k", 1) == 1}
        for r in ks:
            k = r.get("k", 1)
            per = r["seconds"] / k
            rel = f"{per / base[r['shape']]:.2f}" if r["shape"] in base else "–"
            lines.append(f"| {r['shape']} | {k} | {r['seconds']:.3f} | {per:.3f} | {rel} | {r['peak_delta_gb']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
