"""A stage's ``TorchTrainer.fit()`` off the driver's main thread, and a clean stop on Ctrl-C.

Why off the main thread: there Ray Train installs its own SIGINT handler and never removes
it; Ctrl-C then aborts the Train run and the process exits 1 with no message, during the
stage and in every phase after it. Off the main thread Train leaves SIGINT alone (as under
Tune), so Ctrl-C raises KeyboardInterrupt on the main thread and the CLI closes the MLflow
runs, stops Ray and exits 130; the stage's checkpoints stay for the re-run.

Why the stop waits for the helper thread: at Ctrl-C that thread is still blocked inside
Train's ``ray.get(controller.run.remote())``. Shutting Ray down destroys the driver's core
worker under it, and that crashed the process now and then (SIGSEGV, exit -11 instead of 130;
seen in CI, and reproduced here about once in four interrupts on a loaded machine). So
before the KeyboardInterrupt goes on, the run's Train controller is ended, which makes that
``ray.get`` raise, and the thread is awaited. How it is ended depends on who owns Ray: on a
local instance this process started (the CLI's default), which goes with the process, it is
killed at once (Ctrl-C to exit: 5-12 s here, ``benchmarks/interrupt.py``); on a cluster or an
instance that outlives the command, Train's own abort runs first (10-15 s here), because a
killed controller left its workers' placement group, and with it their CPUs, reserved (seen
in a test session).

The controller's handle reaches the driver through :class:`ControllerLink`, a Ray Train
controller callback (a DeveloperAPI) that hands it to the stage's
:class:`~pdd_ray.distill.stage_progress.ProgressBoard`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from pdd_ray.runtime import started_local_instance

try:  # Ray Train v2's controller callbacks; absent in other Ray versions
    from ray.train.v2._internal.constants import is_v2_enabled
    from ray.train.v2._internal.execution.callback import ControllerCallback
except ImportError:  # pragma: no cover - depends on the installed Ray
    ControllerCallback = None


if ControllerCallback is not None:

    class ControllerLink(ControllerCallback):
        """Runs in the Train controller: hands the controller's own actor handle to the board."""

        def __init__(self, board) -> None:
            self.board = board

        def after_controller_start(self, train_run_context) -> None:
            self.board.set_controller.remote(ray.get_runtime_context().current_actor)


def controller_callbacks(board) -> list:
    """``[ControllerLink(board)]`` for the stage's ``RunConfig``, or ``[]`` where this Ray Train
    has no controller callbacks (then an interrupted fit can only be waited for, briefly)."""
    if ControllerCallback is None or not is_v2_enabled():
        return []
    return [ControllerLink(board)]


def fit_off_main_thread(trainer, board, linked: bool, grace_s: float = 30.0) -> Any:
    """``trainer.fit()`` in a helper thread while the main thread waits; its result or error.

    On an exception in the main thread (Ctrl-C), the run's controller is ended and the helper
    thread awaited for up to ``grace_s`` before the exception goes on (see the module
    docstring); ``linked`` says whether the controller will report its handle to ``board``.
    """
    box: dict = {}
    finished = threading.Event()

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = err
        finally:
            finished.set()

    # finished, not thread.is_alive(): on Python 3.11 a join() cut short by Ctrl-C marks the
    # thread stopped while it still runs
    try:
        threading.Thread(target=target, name="pdd-ray-stage", daemon=True).start()
        while not finished.wait(0.2):  # a short wait: any interrupt is seen within 0.2 s
            pass
    except BaseException:
        stop_fit(board, finished, grace_s if linked else 2.0, graceful=not started_local_instance())
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def stop_fit(board, finished: threading.Event, grace_s: float, graceful: bool = True) -> bool:
    """End the fit's controller (as soon as it has reported its handle), then wait until
    ``finished`` is set or ``grace_s`` has passed; whether the fit has returned. ``graceful``:
    Train's abort first (see the module docstring), else a kill at once."""
    deadline = time.monotonic() + grace_s
    ended = False
    while not finished.is_set() and time.monotonic() < deadline:
        if not ended:
            ended = _end_controller(board, abort_s=20.0 if graceful else 0.0)
        finished.wait(0.2)
    return finished.is_set()


def _end_controller(board, abort_s: float) -> bool:
    """End the controller the board knows; False while it knows none (Train still starting).

    With ``abort_s`` > 0, Train's own abort first, as its SIGINT handler on the main thread
    does: it stops the workers (up to 5 s of patience each) and releases their placement
    group, then ends the controller. A killed controller leaves that placement group to
    Train's detached cleaner, which missed it in a test. The kill covers a controller too busy
    or too broken to abort, and is all there is with ``abort_s`` = 0.
    """
    try:
        handle = ray.get(board.controller.remote(), timeout=5)
    except Exception:  # noqa: BLE001 - board or Ray already gone: nothing left to end
        return False
    if handle is None:
        return False
    if abort_s > 0:
        try:
            ray.get(handle.abort.remote(), timeout=abort_s)
        except Exception:  # noqa: BLE001 - the abort ends the actor (RayActorError), or timed out
            pass
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
    return True
