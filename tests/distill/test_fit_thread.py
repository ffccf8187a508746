"""Ctrl-C during a stage's fit: the fit has returned before the KeyboardInterrupt goes on, so
that the CLI's Ray shutdown never runs under a thread blocked in ``ray.get`` (which crashed
the process with SIGSEGV, exit -11, in CI)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from pdd_ray.distill.fit_thread import controller_callbacks, fit_off_main_thread
from pdd_ray.distill.stage_progress import ProgressBoard


@ray.remote(num_cpus=0, max_concurrency=2)
class _Hang:
    """Stands in for Train's controller: ``run`` never returns on its own; ``abort`` ends the
    actor after ``abort_s``, as Train's does after stopping its workers."""

    def __init__(self, abort_s: float = 0.0) -> None:
        self.abort_s = abort_s

    def run(self) -> None:
        time.sleep(600)

    def abort(self) -> None:
        time.sleep(self.abort_s)
        ray.actor.exit_actor()


class _BlockedTrainer:
    """``fit()`` blocks in ``ray.get`` on the controller's ``run``, as Train's fit does."""

    def __init__(self, controller) -> None:
        self.controller = controller
        self.exited = threading.Event()
        self.error: BaseException | None = None

    def fit(self):
        try:
            return ray.get(self.controller.run.remote())
        except BaseException as err:
            self.error = err
            raise
        finally:
            self.exited.set()


def _interrupt_after(seconds: float) -> threading.Timer:
    """Ctrl-C (a real SIGINT to this process, whose main thread runs the test) after ``seconds``."""
    timer = threading.Timer(seconds, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_ctrl_c_kills_the_controller_and_the_fit_has_returned_before_the_interrupt_goes_on(ray_session):
    board = ProgressBoard.remote()
    controller = _Hang.remote()
    board.set_controller.remote(controller)
    trainer = _BlockedTrainer(controller)
    _interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        fit_off_main_thread(trainer, board, linked=True, grace_s=30)
    assert trainer.exited.is_set(), "the fit was still blocked in ray.get when the interrupt went on"
    assert isinstance(trainer.error, ray.exceptions.RayActorError)
    ray.kill(board)


def test_on_a_local_instance_of_its_own_the_controller_is_killed_without_waiting_for_its_abort(ray_session, monkeypatch):
    """The CLI's default: Ray goes with the process, so Ctrl-C need not wait for Train's slow
    abort (10-15 s here); the fit has still returned before the interrupt goes on."""
    from pdd_ray.distill import fit_thread

    monkeypatch.setattr(fit_thread, "started_local_instance", lambda: True)
    board = ProgressBoard.remote()
    controller = _Hang.remote(abort_s=60)
    board.set_controller.remote(controller)
    trainer = _BlockedTrainer(controller)
    _interrupt_after(0.5)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fit_off_main_thread(trainer, board, linked=True, grace_s=30)
    assert trainer.exited.is_set()
    assert time.monotonic() - t0 < 10, "the stop waited for the controller's abort"
    ray.kill(board)


def test_a_real_train_run_interrupted_early_ends_through_its_controller(ray_session, tmp_path):
    """Ctrl-C 1 s into a real fit, usually before Train's controller has reported (it takes
    4-7 s to start here): the stop waits for its handle (sent by ControllerLink from inside
    the real controller), ends it, fit() has returned and the CPUs are free again."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        time.sleep(600)

    board = ProgressBoard.remote()
    callbacks = controller_callbacks(board)
    assert callbacks, "this Ray Train has no controller callbacks: Ctrl-C could not end a stage's fit"
    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="hang", storage_path=str(tmp_path), callbacks=callbacks))
    ended = threading.Event()
    real_fit = trainer.fit

    def fit():
        try:
            return real_fit()
        finally:
            ended.set()

    trainer.fit = fit
    _interrupt_after(1.0)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fit_off_main_thread(trainer, board, linked=True, grace_s=60)
    assert ended.is_set(), "fit() had not returned when the interrupt went on"
    assert ray.get(board.controller.remote()) is not None  # the real controller reported itself
    assert time.monotonic() - t0 < 60
    ray.kill(board)
    _assert_all_cpus_free_within(30)


def _assert_all_cpus_free_within(seconds: float) -> None:
    """The stopped run released its workers' CPUs (a leaked placement group would hold them for
    the rest of a Ray session that outlives the command)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()} of {ray.cluster_resources()}"
        time.sleep(0.5)


def test_only_the_instance_the_process_started_counts_as_its_own(tmp_path):
    """Before it, after it is shut down, and for an instance someone else started later (a
    test session's, a notebook's), ``started_local_instance`` is False: there a Ctrl-C must take
    Train's abort, not the kill that would leave CPUs reserved."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import ray\n"
        "from pdd_ray import runtime\n"
        "seen = [runtime.started_local_instance()]\n"
        "runtime.ensure_ray(1); seen.append(runtime.started_local_instance())\n"
        "runtime.shutdown_ray(); seen.append(runtime.started_local_instance())\n"
        "ray.init(address='local', num_cpus=1, logging_level='ERROR'); seen.append(runtime.started_local_instance())\n"
        "ray.shutdown(); print(seen)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[False, True, False, False]"
