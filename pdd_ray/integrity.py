"""Content digests that let readers tell a damaged file from a good one.

Why: a file can be whole in structure yet hold wrong bytes (a bad disk sector, a partial
copy between machines, a stray write). Arrow, NPZ and JSON parsers only check structure, so
such damage reached training as NaNs or 3e38 weights. Writers record a SHA-256 per file
(stage records, the artifact; trajectory files use a CRC-32 per snapshot, see
:mod:`pdd_ray.experts.store`) and readers compare before they use the bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pdd_ray.errors import PddError
from pdd_ray.storage import Folder

__all__ = ["file_sha256", "verify_files"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(root: str | Path | Folder, digests: Mapping[str, str], what: str, fix: str) -> dict[str, bytes]:
    """Every ``root/name``'s bytes, once each has its recorded digest; else a one-line :class:`PddError`.

    The bytes are returned so that readers parse what was checked instead of reading (from an
    object store: downloading) each file a second time. ``what`` names the container in the
    message ("artifact /x/artifact"), ``fix`` says what to do about it.
    """
    if not isinstance(digests, Mapping):
        raise PddError(f"{what} has a malformed sha256 list ({type(digests).__name__}); {fix}")
    root = Folder.at(root)  # local folders and object stores alike
    verified: dict[str, bytes] = {}
    for name, digest in sorted(digests.items()):
        path = root / name
        if Path(name).name != name or not path.is_file():
            raise PddError(f"{what} is incomplete: {name} is missing; {fix}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise PddError(f"{what} is damaged: {name} does not match its recorded sha256 (truncated or corrupt); {fix}")
        verified[name] = data
    return verified
