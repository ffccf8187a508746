"""CPU seconds by process role while a command runs (Linux ``/proc``), and how busy the cores were.

Why: on 2 cores a whole ``pdd-ray run`` is CPU-bound, so its wall time is the sum of what every
process burns (the stage worker, evaluation tasks, experts, the driver, and Ray's own actors and
daemons) divided by the cores. Wall time by phase (``run_time.py``) cannot say which of these
to cut; this can. A thread samples every process that appears after the start, every
``interval`` seconds: user + system CPU time from ``/proc/PID/stat``, its name from
``/proc/PID/cmdline``. Ray names its workers ``ray::Class.method`` or ``ray::task``; a pooled
worker between tasks is ``ray::IDLE``, and before its title is set a worker shows as
``setup_worker.py`` or ``default_worker.py``, so a process is filed under the most telling
name it showed (:func:`_rank`). A process's last ``interval`` before it exits, and processes
shorter than ``interval``, are missed: the sums are slight underestimates.

    sampler = ProcessCPU(); sampler.start(); ...run...; report = sampler.stop()
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class _Seen:
    name: str
    cpu: float = 0.0


def role(cmdline: str) -> str:
    """A process's role from its command line: Ray's worker titles without the method, the
    script or binary otherwise (``python -m pdd_ray run`` is "driver (pdd_ray)")."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]
    if "-m" in words and words.index("-m") + 1 < len(words):
        return f"driver ({words[words.index('-m') + 1]})"
    scripts = [w for w in words[1:] if w.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else words[0])


def _rank(name: str) -> int:
    """Which name a process is filed under: a Ray worker starts as ``setup_worker.py`` or
    ``default_worker.py``, then sets its title; ``ray::Class`` or ``ray::task`` wins over
    ``ray::IDLE`` (a pooled worker between tasks), which wins over a script's name."""
    if name.startswith("ray::"):
        return 1 if name == "ray::IDLE" else 2
    return 0


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def _read(pid: str) -> tuple[str, float] | None:
    """(command line, CPU seconds) of one process, or None if it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return cmdline, (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class ProcessCPU:
    """Samples the processes started after :meth:`start` until :meth:`stop`."""

    interval: float = 0.5
    _before: set[str] = field(default_factory=set)
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _busy0: tuple[int, int] = (0, 0)

    def start(self) -> None:
        if not os.path.isfile("/proc/stat"):
            raise SystemExit("process_cpu: needs Linux /proc (not found); run without --processes")
        self._before = {p for p in os.listdir("/proc") if p.isdigit()}
        self._busy0 = _busy_jiffies()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in self._before:
                continue
            got = _read(pid)
            if got is None:
                continue
            name, cpu = role(got[0]), got[1]
            seen = self._seen.setdefault(pid, _Seen(name))
            if _rank(name) > _rank(seen.name):
                seen.name = name
            seen.cpu = max(seen.cpu, cpu)

    def stop(self) -> dict:
        """Stop sampling; CPU seconds and process counts by role, and the cores' busy fraction."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # the last look, on this thread alone once the sampler has stopped
        busy1 = _busy_jiffies()
        roles: dict[str, dict] = {}
        for seen in self._seen.values():
            r = roles.setdefault(seen.name, {"cpu_seconds": 0.0, "processes": 0})
            r["cpu_seconds"] += seen.cpu
            r["processes"] += 1
        ordered = dict(sorted(roles.items(), key=lambda kv: -kv[1]["cpu_seconds"]))
        busy = (busy1[0] - self._busy0[0]) / max(1, busy1[1] - self._busy0[1])
        return {"busy_fraction": busy, "roles": ordered,
                "cpu_seconds_total": sum(r["cpu_seconds"] for r in ordered.values())}


def markdown(report: dict, at_least: float = 1.0) -> str:
    """Roles with at least ``at_least`` CPU seconds, largest first, and the rest summed."""
    lines = ["| process role | processes | CPU seconds |", "|---|---|---|"]
    rest = 0.0
    for name, r in report["roles"].items():
        if r["cpu_seconds"] < at_least:
            rest += r["cpu_seconds"]
            continue
        lines.append(f"| `{name}` | {r['processes']} | {r['cpu_seconds']:.1f} |")
    lines.append(f"| everything else | | {rest:.1f} |")
    lines.append(f"| **all** (cores {100 * report['busy_fraction']:.0f} % busy) | | **{report['cpu_seconds_total']:.1f}** |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a quick look: python benchmarks/process_cpu.py CMD...
    import subprocess
    import sys

    sampler = ProcessCPU()
    sampler.start()
    t0 = time.perf_counter()
    subprocess.run(sys.argv[1:], check=False)
    print(f"wall {time.perf_counter() - t0:.1f} s")
    print(markdown(sampler.stop()))
