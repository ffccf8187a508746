"""Shared fixtures: one local Ray instance per test session, and tiny configs (``tiny_overrides``)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


#: The slowest groups (issue 13), marked ``slow`` so that ``pytest -m "not slow"`` runs the
#: fast suite alone; CI runs everything. Whole modules: cluster submission, MLflow tracking,
#: sweeps and the scripted end-to-end runs; elsewhere the tests that use an end-to-end
#: driver fixture.
SLOW_MODULES = {"test_cluster", "test_tracking", "test_sweep", "test_own_data", "test_reliability",
                "test_concurrent_runs"}
SLOW_FIXTURES = {"finished", "uninterrupted", "twin_runs", "dm_run", "idc_run", "two_workers"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once (2 CPUs, no dashboard); every Ray-using test shares it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _tiny_overrides(storage: str) -> list[str]:
    """Digits at the smallest sizes that still exercise every code path quickly."""
    return [
        f"storage={storage}",
        "name=tiny",
        "model.width=8",
        "experts.num_experts=2",
        "experts.epochs=4",
        "experts.batch_size=256",
        "distill.num_stages=2",
        "distill.ipc_per_stage=1",
        "distill.iterations=4",
        "distill.syn_steps=3",
        "distill.expert_epochs=1",
        "distill.max_start_epoch=2",
        "distill.eval_every=2",
        "distill.eval_runs=1",
        "distill.eval_epochs=5",
        "distill.checkpoint_every=2",
        "distill.cpus_per_worker=1",
        "distill.transition_syn_epochs=3",
        "evaluation.runs=2",
        "evaluation.epochs_per_stage=5",
        "evaluation.full_epochs=1",
        "tracking.enabled=false",
    ]


@pytest.fixture(scope="session")
def tiny_overrides():
    """The function ``tiny_overrides(storage) -> list[str]``: digits at the smallest sizes that
    still exercise every code path quickly, writing under ``storage``."""
    return _tiny_overrides


@pytest.fixture(scope="session")
def frozen_spy():
    """A context manager: inside it, ``driver.run_stage`` records, per stage k, copies of the
    frozen stages' images the driver handed it (``with frozen_spy() as seen: ...; seen[k]``)."""
    from contextlib import contextmanager

    @contextmanager
    def spy():
        from pdd_ray.distill import driver

        seen: dict = {}
        real_run_stage = driver.run_stage

        def run_stage(cfg_, prepared_, directory, k, key, frozen, *a, **kw):
            seen[k] = [s.images.clone() for s in frozen]
            return real_run_stage(cfg_, prepared_, directory, k, key, frozen, *a, **kw)

        mp = pytest.MonkeyPatch()
        mp.setattr(driver, "run_stage", run_stage)
        try:
            yield seen
        finally:
            mp.undo()

    return spy
