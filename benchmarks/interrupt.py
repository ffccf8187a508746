"""Ctrl-C during a stage, many times: exit statuses and the seconds from SIGINT to exit.

Why: a Ctrl-C that stopped Ray under a thread still blocked in Train's ``ray.get`` crashed the
process now and then (SIGSEGV, exit -11; once in CI, about one interrupt in four on a loaded
machine); a one-off test cannot show a rate, and the stop's cost (Ctrl-C to exit) is a number
to watch. Each trial runs the tiny digits run of the test suite (``tests/conftest.py``) as the
CLI, waits until stage 1's Train folder exists, waits ``delay`` seconds more, sends SIGINT to
the process group as a terminal does, and records the exit status and time. ``--load N``
starts N busy loops beside it (the crash needed a loaded machine to show).

    python benchmarks/interrupt.py --delays 0.5,1,2,3 [--load 2] [--source DIR] [--out FILE]

Start it from an interactive shell or a foreground command: a command started with ``&`` in
a non-interactive shell inherits SIGINT ignored, and then no interrupt arrives at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdd_ray.atomic import write_text_atomic

REPO = Path(__file__).resolve().parent.parent


def one_trial(source: Path, delay: float, work: Path, tiny_overrides) -> dict:
    """Run, interrupt ``delay`` s into stage 1, wait for the exit; status, seconds, stderr tail."""
    storage = Path(tempfile.mkdtemp(prefix="run", dir=work)) / "s"
    ray_tmp = tempfile.mkdtemp(prefix="pdr", dir="/tmp")  # short: Ray's socket paths have a length limit
    overrides = [o for o in tiny_overrides(str(storage)) if not o.startswith("tracking")]
    argv = [sys.executable, "-m", "pdd_ray", "run", "digits", *overrides, "distill.iterations=400", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(source), "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(argv, cwd=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    while not list(storage.glob("runs/*/train/stage_1")):
        if proc.poll() is not None:
            return {"delay_s": delay, "rc": proc.returncode, "exit_s": None, "note": "ended before stage 1",
                    "stderr_tail": proc.communicate()[1][-1500:]}
        time.sleep(0.25)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"delay_s": delay, "rc": proc.returncode, "exit_s": round(time.monotonic() - t0, 1),
            "stderr_tail": "" if proc.returncode == 130 else err[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delays", default="0.5,1,2,3", help="seconds into stage 1, one trial each (comma-separated)")
    p.add_argument("--load", type=int, default=0, help="busy-loop processes beside the run (default 0)")
    p.add_argument("--source", type=Path, default=REPO, help="the pdd_ray tree to run (default: this one)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/interrupt.json")
    args = p.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    source = args.source.resolve()
    sys.path.insert(0, str(source / "tests"))
    from conftest import _tiny_overrides  # the test suite's tiny digits run
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    trials = []
    try:
        with tempfile.TemporaryDirectory(prefix="pdd_interrupt") as work:
            for d in delays:
                t = one_trial(source, d, Path(work), _tiny_overrides)
                trials.append(t)
                print(f"delay {d:4.1f} s: exit {t['rc']}, {t['exit_s']} s after SIGINT", flush=True)
    finally:
        for b in busy:
            b.kill()
    clean = sum(t["rc"] == 130 for t in trials)
    times = sorted(t["exit_s"] for t in trials if t["rc"] == 130)
    print(f"{clean} of {len(trials)} exited 130" + (f"; Ctrl-C to exit {times[0]}-{times[-1]} s" if times else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"load": args.load, "source": str(args.source), "trials": trials}, indent=2) + "\n")


if __name__ == "__main__":
    main()
