"""Shared fixtures: one local Ray instance per test session, and tiny configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once (2 CPUs, no dashboard); every Ray-using test shares it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_overrides(storage: str) -> list[str]:
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


@pytest.fixture
def tiny_cfg(tmp_path):
    from pdd_ray.config import load_config

    return load_config("digits", tiny_overrides(str(tmp_path / "out")))
