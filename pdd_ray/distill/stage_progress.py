"""Live progress of a running stage: the workers push to a tiny actor, a driver thread draws.

(Plain progress lines and phases are :mod:`pdd_ray.progress`; this module is the stage's
actor and the thread that turns its state into a bar and those lines.) When the run is
tracked, rank 0 also records every iteration's metrics and each validation's images on the
actor, and the same driver thread hands them to a :class:`StageSink` (MLflow's is
``pdd_ray.tracking.StageLogger``): the workers themselves never talk to a tracker.
"""

from __future__ import annotations

import threading
import time

import ray
from tqdm.auto import tqdm

from pdd_ray.distill.callbacks import StageSink
from pdd_ray.progress import Milestones, time_left
from pdd_ray.progress import log as progress_log


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Tiny actor the stage workers report to, so the driver can draw a live progress bar and
    log what rank 0 recorded."""

    def __init__(self) -> None:
        self.state: dict = {}
        self.records: list[tuple[str, int, object]] = []
        self.controller_handle = None

    def set_controller(self, handle) -> None:
        """Keep the stage's Train controller (from :class:`pdd_ray.distill.fit_thread.ControllerLink`)."""
        self.controller_handle = handle

    def controller(self):
        """The stage's Train controller, or None before it has started."""
        return self.controller_handle

    def update(self, **kw) -> None:
        self.state.update(kw)

    def get(self) -> dict:
        return dict(self.state)

    def record(self, kind: str, step: int, payload: object) -> None:
        """Keep one record for the driver: ``("metrics", step, {name: value})`` or
        ``("images", step, (images, labels))``, the images and labels as NumPy arrays (this
        actor never imports torch)."""
        self.records.append((kind, step, payload))

    def drain(self) -> list[tuple[str, int, object]]:
        """The records since the last drain, oldest first."""
        out, self.records = self.records, []
        return out


def _forward(board, sink: StageSink | None) -> None:
    """Hand rank 0's records to ``sink``, in the order they were made."""
    if sink is None:
        return
    try:
        records = ray.get(board.drain.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - Ray going down (Ctrl-C): nothing more to log
        return
    for kind, step, payload in records:
        if kind == "metrics":
            sink.metrics(step, **payload)
        else:
            import torch  # the driver has it already; the board's module must not import it

            sink.images(step, *(torch.tensor(a) for a in payload))  # a copy: Ray hands back read-only arrays


def _watch(board, total: int, desc: str, enabled: bool, stop: threading.Event, sink: StageSink | None = None) -> None:
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
        _forward(board, sink)
        stop.wait(0.5)
    poll()  # the last iterations finished after the previous poll
    _forward(board, sink)
    if sink is not None:
        sink.flush()
    bar.update(max(0, total - seen["last"]))
    bar.close()
