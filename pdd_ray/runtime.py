"""Starting or joining Ray, quietly and once."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or a job's cluster), else start a local one.

    A local instance gets no dashboard (saves memory and start-up time on a laptop); inside a
    submitted Ray job ``ray.init()`` attaches to the job's cluster automatically.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING", log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=True,
    )
