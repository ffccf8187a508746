"""Does a change to the digits preset make PDD's lead over the random subset larger? (issue 18)

Why: the first run must stay fast *and* keep PDD after the last stage at least 1 point above
the random subset at the same total IPC and training budget. A preset change that looks better
on one seed can be the evaluation's noise (digits' test split is 360 images: one point is
3-4 images), so every variant runs on the same seeds, in one storage folder (the experts and
baselines of a seed are computed once and reused by digest, so variants differ only in what
they change), and the table lists each seed's gap.

Runs ``pdd-ray run digits storage=STORAGE seed=S OVERRIDES --no-progress`` per (seed, variant)
and reads ``results.json``: PDD's test accuracy after each stage, the random subset's, the gap,
and the run's seconds. A run whose stages are already in STORAGE reuses them (only its
evaluation runs again), so re-running the script on the same storage is cheap.

    python benchmarks/preset_variants.py --storage /tmp/variants --seeds 0 1 \\
        --variant default= --variant union=distill.batch_syn_policy=union \\
        --out benchmarks/results/preset_variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdd_ray.atomic import write_text_atomic  # noqa: E402
from pdd_ray.evaluation import EvalResult  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value,key=value`` (or ``name=`` for the preset as it is) -> (name, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=OVERRIDES, e.g. union=distill.batch_syn_policy=union")
    return name, [o for o in rest.split(",") if o]


def summarise(results: dict) -> dict:
    """Mean ± std test accuracy (%) of PDD after each stage and of the random subset, and the gap,
    computed by ``EvalResult`` as ``pdd-ray run``'s table computes them (population std)."""
    pdd = EvalResult.from_dict(next(iter(results["pdd"].values())))
    stages = [(float(m) * 100, float(s) * 100) for m, s in zip(pdd.mean(), pdd.std())]
    random = EvalResult.from_dict(results["random"]).final
    return {"pdd_stages": stages, "random": random, "gap": stages[-1][0] - random[0],
            "seconds": results["seconds"]}


def run_variant(storage: Path, seed: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pdd_ray", "run", "digits", f"storage={storage}", f"seed={seed}", *overrides,
           "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("results:"))
    results = json.loads(Path(line.split(":", 1)[1].strip()).read_text())
    return {"command": " ".join(cmd[1:]), "wall_seconds": wall, **summarise(results)}


def markdown(report: dict) -> str:
    lines = ["# digits preset variants: PDD after the last stage against the random subset",
             "", "Test accuracy % (mean ± std of 5 evaluation runs), same total IPC and training budget; "
             "gap = PDD's last stage minus the random subset. Stage seconds are this invocation's "
             "(0: the stage was reused from the storage, distilled by an earlier run).", "",
             "| variant | seed | random subset | PDD after each stage | gap | stage seconds |", "|---|---|---|---|---|---|"]
    for name, by_seed in report["variants"].items():
        for seed, r in by_seed.items():
            stages = " → ".join(f"{m:.2f} ± {s:.2f}" for m, s in r["pdd_stages"])
            secs = " + ".join(f"{v:.0f}" for k, v in r["seconds"].items() if k.startswith("stage_"))
            lines.append(f"| {name} | {seed} | {r['random'][0]:.2f} ± {r['random'][1]:.2f} | {stages} | "
                         f"{r['gap']:+.2f} | {secs} |")
    lines += ["", "Overrides:", ""] + [f"- {name}: `{' '.join(o) or '(the preset)'}`" for name, o in report["overrides"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", type=Path, required=True, help="one folder for every run (experts shared per seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variant", type=parse_variant, action="append", required=True,
                    help="NAME=key=value,key=value (NAME= for the preset unchanged); repeat for more")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/preset_variants.json"))
    args = ap.parse_args(argv)
    report: dict = {"benchmark": "digits preset variants", "seeds": args.seeds,
                    "overrides": {n: o for n, o in args.variant}, "variants": {}}
    for seed in args.seeds:
        for name, overrides in args.variant:
            print(f"preset_variants: seed {seed}, {name} ...", flush=True)
            r = run_variant(args.storage, seed, overrides)
            report["variants"].setdefault(name, {})[str(seed)] = r
            print(f"  PDD {r['pdd_stages'][-1][0]:.2f}, random {r['random'][0]:.2f}, gap {r['gap']:+.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2))
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
