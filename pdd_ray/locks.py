"""Cross-process locks on one storage root (local disks and shared NFS folders), stdlib only.

Why: users start several runs, sweeps and ``pdd-ray experts`` against one ``storage``. Without
a lock two identical runs both train every expert and every stage (the last rename wins, so
nothing is corrupted, but the work is done twice) and race on the MLflow store's creation.
With it, the second waits for the first and then finds its experts and stages finished.

Mechanism: ``fcntl.flock`` on a small lock file. The kernel drops the lock when its holder
dies, even on SIGKILL or a power cut, so a crashed run never leaves a stale lock behind and
nothing has to guess whether an old holder is alive. Linux NFS clients map ``flock`` onto
NFS byte-range locks, so the lock also holds between the nodes of a cluster sharing the
folder (it does not on a mount with ``nolock``, where locks are local to each node). The lock
file records the holder's pid, host and start time; a waiting process prints them once. On a
file system that refuses locks (some FUSE mounts) a warning is printed and the work runs
unlocked, as before locks existed.

Within one process the lock is re-entrant per thread (a thread holding it may take it again)
and excludes other threads, so nested helpers can lock without deadlocking themselves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pdd_ray.errors import PddError

__all__ = ["LockTimeout", "file_lock"]

#: errno values that mean "this file system does not do locks", not "someone holds it".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}

_registry_guard = threading.Lock()
_registry: dict[str, _Held] = {}


class LockTimeout(PddError):
    """Raised when a lock is still held by another process after ``timeout`` seconds."""


class _Held:
    """One lock path inside this process: a thread lock (re-entrant) plus the OS lock's fd."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


def _holder(path: Path) -> str:
    """Who holds ``path`` as recorded in it ("pid 12 on host h since 12:00:01"), best effort."""
    try:
        info = json.loads(path.read_text() or "{}")
        since = time.strftime("%H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on host {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire_os_lock(path: Path, what: str, timeout: float | None, poll: float, quiet: bool) -> int | None:
    """Open ``path`` and flock it exclusively; returns the fd (None: locking unsupported here)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PddError(f"cannot create the lock file {path} ({err.strerror}); check that its folder is writable") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno in _UNSUPPORTED:
                os.close(fd)
                print(f"pdd-ray: warning: {path.parent} does not support file locks ({err.strerror}); "
                      f"{what} runs unprotected against concurrent runs", file=sys.stderr)
                return None
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if deadline is not None and time.monotonic() >= deadline:
            os.close(fd)
            raise LockTimeout(f"{what} is still locked by {_holder(path)} after {timeout:g} s (lock file {path}); "
                              "wait for that run to finish")
        if not told and not quiet:
            print(f"pdd-ray: waiting for {what}: in use by {_holder(path)} (lock file {path})", file=sys.stderr)
            told = True
        time.sleep(poll)
    try:  # say who holds it, for the message a waiting process prints
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                  "what": what}).encode(), 0)
    except OSError:
        pass
    return fd


@contextmanager
def file_lock(path: str | os.PathLike, what: str, timeout: float | None = None, poll: float = 0.5,
              quiet: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``what`` names the protected thing in messages ("run directory /x/runs/digits-ab12").
    Blocks until the lock is free (printing once who holds it unless ``quiet``), or raises
    :class:`LockTimeout` after ``timeout`` seconds. The lock file is left in place: deleting
    it while others wait on it would let two processes hold "the" lock at once.
    """
    key = os.path.abspath(os.fspath(path))
    with _registry_guard:
        held = _registry.setdefault(key, _Held())
    if not held.thread_lock.acquire(timeout=-1 if timeout is None else timeout):
        raise LockTimeout(f"{what} is still locked by another thread of this process after {timeout:g} s")
    try:
        if held.depth == 0:
            held.fd = _acquire_os_lock(Path(key), what, timeout, poll, quiet)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fd, held.fd = held.fd, None
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)
    finally:
        held.thread_lock.release()
