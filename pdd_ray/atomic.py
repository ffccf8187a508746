"""Writing a file so that it never carries its final name half-written.

Everything pdd_ray writes goes to a temporary name beside its destination (same folder, so
the same filesystem) and is renamed when complete: a crash or a kill leaves debris under a
``.tmp-`` name, never a truncated record, artifact or result that a re-run would trust.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: Path, suffix: str = "") -> Path:
    """``.<name>.tmp-<uuid><suffix>`` beside ``path`` (``suffix`` for writers that insist on an
    extension, such as ``np.savez``)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}{suffix}")


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on an error the
    temporary file is removed (only a killed process leaves one behind)."""
    tmp = temp_name(path, suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
