"""Starting or joining Ray, quietly and once."""

from __future__ import annotations

import os

import ray

#: Set to 1 to see every Ray worker's log lines (Train's per-checkpoint chatter included).
VERBOSE_ENV = "PDD_RAY_VERBOSE"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or a job's cluster), else start a local one.

    A local instance keeps worker logs to itself unless ``PDD_RAY_VERBOSE=1``: failures still
    reach the driver as exceptions, and progress comes through pdd_ray's own bars. The
    dashboard stays on because Ray Train's placement-group cleaner queries the State API.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    verbose = os.environ.get(VERBOSE_ENV, "0") not in ("", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="INFO" if verbose else "WARNING", log_to_driver=verbose)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        logging_level="INFO" if verbose else "ERROR",
        log_to_driver=verbose,
        configure_logging=True,
    )
