"""Starting or joining Ray, quietly and once; the local folders a run writes; stopping cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from pdd_ray.allocator import keep_freed_memory
from pdd_ray.errors import PddError
from pdd_ray.storage import Folder, is_remote

#: Set to 1 to see every Ray worker's log lines (Train's per-checkpoint chatter included).
VERBOSE_ENV = "PDD_RAY_VERBOSE"

#: Ray Train's controller polls its workers this often (Ray's default, 2 s, made every stage
#: end up to 2 s after its workers had finished: measured 3.5 s from the worker's return to
#: ``fit()`` returning, 0.9 s at 0.25 s). Set in the driver, Train hands it to its controller;
#: a value the user exported wins.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"


#: The node id of the local Ray instance this process started (``ensure_ray``), if any: then
#: everything on it ends with the process, and a Ctrl-C can stop a stage without Train's slow
#: abort. An id, not a flag: after that instance is shut down, a later one (a test session's,
#: a notebook's) is not the process's own.
_STARTED_NODE: str | None = None


def started_local_instance() -> bool:
    """True when this process started the local Ray instance it uses (not a cluster's, not one
    that was up before, as in a notebook or a test session)."""
    return ray.is_initialized() and _STARTED_NODE == ray.get_runtime_context().get_node_id()


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or a job's cluster), else start a local one.

    A local instance keeps worker logs to itself unless ``PDD_RAY_VERBOSE=1``: failures still
    reach the driver as exceptions, and progress comes through pdd_ray's own bars. The
    dashboard stays on because Ray Train's placement-group cleaner queries the State API.
    """
    keep_freed_memory()  # the driver trains too (baselines, local evaluation)
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
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
    global _STARTED_NODE
    _STARTED_NODE = ray.get_runtime_context().get_node_id()


def ensure_storage(cfg) -> None:
    """Create the run's local storage roots now (``storage``, ``experts.storage``), so a path that
    cannot be created is one line naming it, not a traceback from deep inside MLflow or Ray.

    An object store (``s3://bucket/x``) is checked the same way: its bucket must exist and answer
    with the endpoint and credentials this process has.
    """
    from pdd_ray.experts.produce import expert_store_root

    for key, root in (("storage", cfg.storage_root), ("experts.storage", expert_store_root(cfg))):
        root = root.removeprefix("file://")
        if is_remote(root):
            _check_bucket(key, Folder.at(root))
            continue
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PddError(f"{key} = {root!r} cannot be created ({err.strerror or err}); "
                           "pass a folder you can write to") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise PddError(f"{key} = {root!r} is not writable; pass a folder you can write to")


def _check_bucket(key: str, folder: Folder) -> None:
    """One line, now, when an object-store root's bucket is missing or unreachable."""
    bucket = Folder(folder.fs, folder.path.split("/", 1)[0], folder.scheme)
    if not bucket.is_dir():  # unreachable endpoints and bad credentials raise their own one line
        raise PddError(f"{key} = {str(folder)!r}: bucket {str(bucket)!r} does not exist; create it or pass another")


def shutdown_ray() -> None:
    """Stop the local Ray instance (or leave the cluster) this process started; never raises.

    Used on Ctrl-C: a local instance's raylet, GCS and workers (Train workers, expert actors)
    all go with it; on a cluster the driver's non-detached actors are ended by Ray.
    """
    try:
        if ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C or a dead GCS must not hide the exit status
        pass
