"""Where a run's files live: a local or NFS folder, or a prefix in an object store (``s3://``, ``gs://``).

Why: a cluster user gives one ``storage`` URI and expects everything to land there: the stage
records, Ray Train's checkpoints, the artifact, ``results.json`` and the baseline cache, as the
expert trajectories already do (:mod:`pdd_ray.experts.store`). :class:`Folder` is the one
:mod:`pyarrow.fs` code path they all go through, so a local path, ``file://``, ``s3://`` and
``gs://`` behave the same to the code that writes a run.

Atomicity, so that nothing half-written is ever trusted:

* local and NFS folders: every file is written under a ``.tmp-`` name beside its destination
  and renamed when complete (:mod:`pdd_ray.atomic`), as before;
* object stores: one PUT appears whole or not at all, so objects are written under their final
  name directly (S3 has no rename; a copy would double the bytes). Sets of files keep their
  completion marker (a stage's ``manifest.json``, the artifact's manifest) for last, so a
  reader never takes a partly uploaded set for a finished one.

Endpoint and credentials come from pyarrow's usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or the GCS ones; every
process that touches the storage (the driver, Ray Train workers, expert actors) needs them.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pdd_ray.atomic import atomic_path
from pdd_ray.errors import PddError

__all__ = ["Folder", "is_remote"]

ACCEPTED = "a local path, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"


def is_remote(where: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``...); False for paths and ``file://``."""
    where = str(where)
    return "://" in where and not where.startswith("file://")


@dataclass(frozen=True)
class Folder:
    """A folder (or object-store prefix) and the file system it lives on; ``/`` names a child.

    Local folders keep :class:`pathlib.Path` semantics (``os.fspath`` works on them); remote
    ones are addressed by their URI (``str(folder)``).
    """

    fs: pafs.FileSystem
    path: str  # inside ``fs``: an absolute local path, or "bucket/prefix"
    scheme: str = ""  # "" for local folders, else "s3", "gs", ...

    @classmethod
    def at(cls, where: str | os.PathLike | Folder, what: str = "storage location") -> Folder:
        """The folder named by a path or URI; a one-line :class:`PddError` (naming ``what``) for
        anything else."""
        if isinstance(where, Folder):
            return where
        text = str(where)
        if not text.strip():
            raise PddError(f"{what} {where!r} is empty; accepted: {ACCEPTED}")
        if not is_remote(text):
            local = text.removeprefix("file://")
            return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local)))
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise PddError(f"{what} {text!r} is not a usable URI ({err}); accepted: {ACCEPTED}") from None
        return cls(fs, path.rstrip("/"), text.split("://", 1)[0])

    # -- naming

    @property
    def local(self) -> bool:
        return not self.scheme

    def __truediv__(self, name: str) -> Folder:
        return Folder(self.fs, posixpath.join(self.path, str(name)) if self.scheme else os.path.join(self.path, name),
                      self.scheme)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Folder:
        return Folder(self.fs, posixpath.dirname(self.path) if self.scheme else os.path.dirname(self.path), self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __fspath__(self) -> str:
        if self.scheme:
            raise TypeError(f"{self} is in an object store and has no local path")
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Folder) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    # -- queries

    def _type(self) -> pafs.FileType:
        try:
            return self.fs.get_file_info(self.path).type
        except (OSError, pa.ArrowException) as err:
            raise PddError(f"storage {self} cannot be reached ({' '.join(str(err).split())[:200]}); "
                           "check the path, or the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)") from None

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def files(self) -> list[Folder]:
        """The files directly inside this folder (none when it does not exist), by name."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        return sorted((self / i.base_name for i in infos), key=lambda f: f.name)

    # -- reading

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as src:
            return src.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    # -- writing

    def mkdir(self) -> None:
        """Create the folder and its parents (object stores have no folders: nothing to do there)."""
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """Write the file so that it never carries its name half-written (see the module's notes)."""
        if self.local:
            self.parent.mkdir()
            with atomic_path(Path(self.path)) as tmp:
                tmp.write_bytes(data)
            return
        with self.fs.open_output_stream(self.path) as sink:
            sink.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def unlink(self) -> None:
        """Delete the file if it is there."""
        if self.is_file():
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete the folder and everything under it, if it is there."""
        if self.is_dir():
            self.fs.delete_dir(self.path)

    def upload(self, local_dir: Path, last: str) -> None:
        """Copy a finished local folder's files here, ``last`` (its completion marker) last.

        What was here before goes first, so an interrupted upload leaves no marker and is
        never read as complete (the run that wrote it re-writes it).
        """
        self.rmtree()
        names = sorted(p.name for p in local_dir.iterdir() if p.is_file())
        for name in [n for n in names if n != last] + [last]:
            (self / name).write_bytes((local_dir / name).read_bytes())
