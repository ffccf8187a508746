"""Plain progress lines, for runs nobody watches in a terminal (``--no-progress``: job logs, scripts).

Progress bars redraw one line and say nothing in a log file; without them a 25-minute run used
to print nothing at all. Every phase therefore also reports to the ``pdd_ray.progress`` logger:
start and end with the duration, experts n/N, each stage at every ~10 % of its iterations with
the loss and the latest validation accuracy, and an estimate of the time left. The CLI shows
these lines (on stderr, like the bars) when bars are off; as a library, pdd_ray stays silent
unless the caller configures that logger.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("pdd_ray.progress")


def enable_lines(stream=None) -> None:
    """Print progress lines to ``stream`` (default stderr), each with the wall-clock time."""
    if any(getattr(h, "_pdd_lines", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("[pdd-ray %(asctime)s] %(message)s", "%H:%M:%S"))
    handler._pdd_lines = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def duration(seconds: float) -> str:
    """``8.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def time_left(done: float, total: float, elapsed: float) -> str:
    """``~3 min 05 s left`` from the rate so far; '' before anything is done."""
    if done <= 0 or total <= done or elapsed <= 0:
        return ""
    return f"~{duration(elapsed / done * (total - done))} left"


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log a phase's start and its end with the duration (or that it stopped)."""
    log.info("%s: started", name)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        log.info("%s: stopped after %s", name, duration(time.perf_counter() - t0))
        raise
    log.info("%s: done in %s", name, duration(time.perf_counter() - t0))


class Milestones:
    """Which counts out of ``total`` are worth a line: every ~``share`` of it, and the last."""

    def __init__(self, total: int, share: float = 0.1, start: int = 0) -> None:
        self.total = total
        self.step = max(1, math.ceil(total * share))
        self.next = (start // self.step + 1) * self.step

    def due(self, done: int) -> bool:
        """True once per crossed milestone (a jump over several gives one line)."""
        if done < min(self.next, self.total):
            return False
        self.next = (done // self.step + 1) * self.step
        return True


def disable_lines() -> None:
    """Undo :func:`enable_lines` (tests that capture the stream)."""
    for h in [h for h in log.handlers if getattr(h, "_pdd_lines", False)]:
        log.removeHandler(h)
