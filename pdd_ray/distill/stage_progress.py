"""Live progress of a running stage: the workers push to a tiny actor, a driver thread draws.

(Plain progress lines and phases are :mod:`pdd_ray.progress`; this module is the stage's
actor and the thread that turns its state into a bar and those lines.)
"""

from __future__ import annotations

import threading
import time

import ray
from tqdm.auto import tqdm

from pdd_ray.progress import Milestones, time_left
from pdd_ray.progress import log as progress_log


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Tiny actor the stage workers report to, so the driver can draw a live progress bar."""

    def __init__(self) -> None:
        self.state: dict = {}

    def update(self, **kw) -> None:
        self.state.update(kw)

    def get(self) -> dict:
        return dict(self.state)


def _watch(board, total: int, desc: str, enabled: bool, stop: threading.Event) -> None:
    bar = tqdm(total=total, desc=desc, unit="it", disable=not enabled)
    seen = {"last": 0, "shown": {}, "lines": None, "first": None}

    def poll() -> None:
        try:
            s = ray.get(board.get.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the bar is cosmetic; never break the run for it
            s = {}
        last = seen["last"]
        it = int(s.get("iteration", last))
        post = {k: f"{v:.4g}" for k, v in s.items() if k in ("loss", "alpha", "val_acc") and v == v}
        # redraw only on news, once: job logs are not a TTY and keep every redraw as a line
        if post and post != seen["shown"]:
            bar.set_postfix(post, refresh=it <= last)
            seen["shown"] = post
        if it <= last:
            return
        if seen["first"] is None:  # the rate excludes Train's start-up; a resumed stage starts past 0
            seen["first"] = (last if last else it - 1, time.perf_counter())
            seen["lines"] = Milestones(total, start=seen["first"][0])  # plain lines: every ~10 %
        bar.update(it - last)
        seen["last"] = it
        if seen["lines"].due(it):
            start, t0 = seen["first"]
            val = s.get("val_acc", float("nan"))
            val_s = f", val {val * 100:.1f}%" if val == val else ""
            left = time_left(it - start, total - start, time.perf_counter() - t0)
            progress_log.info("%s: %d/%d it (%d%%), loss %.4g%s%s", desc, it, total, 100 * it // max(total, 1),
                              s.get("loss", float("nan")), val_s, f", {left}" if left else "")

    while not stop.is_set():
        poll()
        stop.wait(0.5)
    poll()  # the last iterations finished after the previous poll
    bar.update(max(0, total - seen["last"]))
    bar.close()
