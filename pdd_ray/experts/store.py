"""On-disk store of expert trajectories: one Arrow IPC file per expert.

Why this layout:

* Trajectory matching samples a random (expert j, epoch t) pair every distillation step,
  so a reader must fetch one epoch's parameter vector without touching the rest. Each
  epoch is written as its own Arrow record batch; the IPC *file* footer records where
  every batch starts, so a memory-mapped local file only pages in that batch and a
  remote file only downloads that byte range.
* Experts are trained by Ray workers on many nodes. Every file is first written under a
  temporary name ``<final>.tmp-<uuid>`` and then moved to its final name, so a crashed
  worker never leaves a half-written file under a name that :meth:`TrajectoryStore.exists`
  or :meth:`TrajectoryStore.indices` would count.
* Local paths, ``file://``, ``s3://`` and ``gs://`` roots all go through one
  :class:`pyarrow.fs.FileSystem` code path; only opening for reading differs (local files
  are memory-mapped, remote ones are opened for random access).

Object-store caveat: S3 and GCS have no rename. ``move`` is a server-side copy followed
by a delete. Readers still never see a partial final object (a copy appears whole or not
at all), but a crash between the copy and the delete leaves a temp object behind
(:meth:`TrajectoryStore.clean_temp` removes it), and S3 copies a single object in one
request, which caps one expert file at 5 GiB there. Two workers writing the same expert
both produce complete files; the last move wins. On local and NFS roots, producers hold
:meth:`TrajectoryStore.lock` per key, so two runs never train the same expert at once.

No pickle: metadata is JSON, arrays are Arrow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import uuid
import zlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from pdd_ray.errors import PddError
from pdd_ray.locks import file_lock
from pdd_ray.storage import Folder

__all__ = ["FORMAT_VERSION", "TrajectoryReader", "TrajectoryStore", "store_key"]

#: Bumped whenever the file layout changes, so old readers refuse new files loudly.
FORMAT_VERSION = "1"

_META = b"pdd_ray.meta"
_FORMAT = b"pdd_ray.format"
_ROWS = b"pdd_ray.rows"
_EPOCHS = b"pdd_ray.epochs"  # lets a reader know every epoch without fetching any batch
_CRC = b"pdd_ray.crc32"  # one CRC-32 per row (snapshot) over its values: damage inside a batch shows

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FINAL_RE = re.compile(r"expert_(\d{5,})\.arrow")
_TEMP_RE = re.compile(r"expert_\d{5,}\.arrow\.tmp-[0-9a-f]{32}")
_INT32_MAX = 2**31 - 1
_REBUILD = "delete it and re-run `pdd-ray experts` to rebuild it"


# --------------------------------------------------------------------------- keys


def _canonical(value: Any, where: str) -> Any:
    """Reduce ``value`` to plain JSON types, refusing anything ambiguous.

    Done by hand (rather than ``json.dumps(default=str)``) because a silent ``str()`` of an
    object or a set would make the key depend on memory addresses or iteration order, and
    non-string dict keys would collide with their string forms ({1: x} vs {"1": x}).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.str_, np.bytes_)):
        return _canonical(value.item(), where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise PddError(f"{where} has non-string key {k!r}; only string keys are accepted")
            out[k] = _canonical(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise PddError(
        f"{where} is {type(value).__name__} {value!r:.60}; only JSON values "
        "(None, bool, int, float, str, list, tuple, dict) are accepted"
    )


def _dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, floats via repr (shortest round-trip)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def store_key(settings: dict) -> str:
    """16-hex-char digest of every setting that determines trajectories.

    Two configurations that differ in anything that changes the experts must never share
    a directory (their trajectories would be silently mixed), while re-running the same
    configuration must find its experts again, independent of dict ordering.
    Note that ``1`` and ``1.0`` are different settings here: JSON keeps the distinction.
    """
    if not isinstance(settings, Mapping):
        raise PddError(f"store_key settings must be a dict, got {type(settings).__name__}")
    text = _dumps(_canonical(settings, "settings"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- validation


def _check_key(key: str) -> str:
    """Keys become directory names; restrict them so they cannot escape the root."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or ".." in key:
        raise PddError(
            f"store key {key!r} is invalid; use letters, digits, '.', '_' or '-' "
            "(e.g. the result of store_key())"
        )
    return key


def _check_index(index: int) -> int:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
        raise PddError(f"expert index {index!r} is invalid; use an integer >= 0")
    return int(index)


def _check_params(params: np.ndarray) -> np.ndarray:
    if not isinstance(params, np.ndarray) or params.dtype != np.float32 or params.ndim != 2:
        desc = (
            f"{params.dtype} array of shape {params.shape}"
            if isinstance(params, np.ndarray)
            else type(params).__name__
        )
        raise PddError(f"params is a {desc}; expected a 2-D (epochs, parameters) float32 array")
    if params.shape[0] == 0 or params.shape[1] == 0:
        raise PddError(f"params has shape {params.shape}; need at least one epoch and one parameter")
    return np.ascontiguousarray(params)


def _check_epochs(epochs: Sequence[int] | None, rows: int) -> list[int]:
    """Epochs must be unique and increasing so ``params_at_epoch`` is unambiguous."""
    if epochs is None:
        return list(range(rows))
    try:
        out = [_check_index(e) for e in epochs]
    except (PddError, TypeError):
        raise PddError(f"epochs {epochs!r:.80} must be a sequence of integers >= 0") from None
    if len(out) != rows:
        raise PddError(f"epochs has {len(out)} entries but params has {rows} rows; they must match")
    if any(b <= a for a, b in zip(out, out[1:])) or out[-1] > _INT32_MAX:
        raise PddError(f"epochs {out!r:.80} must be strictly increasing and fit in int32")
    return out


def _fixed_list(row: np.ndarray) -> pa.FixedSizeListArray:
    """One row as a length-1 fixed_size_list (zero-copy from numpy for numeric dtypes)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(row), row.shape[0])


def _row_crc(values: Sequence[np.ndarray]) -> int:
    """CRC-32 of one row's values (every column after ``epoch``), as their native bytes.

    CRC-32 rather than a cryptographic hash: it only has to catch accidental damage, and it
    runs at memory speed (a 1.3 MB ConvNet-3 CIFAR snapshot: 0.6 ms on a busy shared CPU).
    """
    crc = 0
    for v in values:
        crc = zlib.crc32(np.ascontiguousarray(v).view(np.uint8), crc)
    return crc


def _row_batch(schema: pa.Schema, epoch: int, params: np.ndarray) -> pa.RecordBatch:
    """Build the record batch for one saved epoch (module level so tests can break it)."""
    arrays = [pa.array([epoch], pa.int32()), _fixed_list(params)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------- store


class TrajectoryStore:
    """Expert trajectory files under ``<root>/<key>/expert_<index:05d>.arrow``.

    ``root`` is a local path (relative paths are made absolute, so Ray workers started in
    another working directory agree on it) or a URI understood by
    :meth:`pyarrow.fs.FileSystem.from_uri` (``file:///abs``, ``s3://bucket/prefix``,
    ``gs://bucket/prefix``). ``filesystem`` lets callers pass a pre-configured pyarrow
    filesystem (custom S3 endpoint or credentials); ``root`` is then a path inside it.
    """

    def __init__(self, root: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
            raise PddError(f"expert store root {root!r} is empty or not a path; give a directory or URI")
        root = str(root)
        if filesystem is not None:
            self._fs = filesystem
            self._base = root.rstrip("/") or "/"
            self.root = self._base
        else:  # one resolution of paths and URIs for every storage root (pdd_ray.storage)
            folder = Folder.at(root, what="expert store root")
            self._fs, self._base = folder.fs, folder.path or "/"
            self.root = str(folder)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.root!r})"

    # -- paths: "_fs_*" are paths inside the filesystem, the rest are shown to users

    def _fs_join(self, *parts: str) -> str:
        return posixpath.join(self._base, *parts)

    def _shown(self, fs_path: str) -> str:
        return self.root + fs_path[len(self._base):] if self.root != self._base else fs_path

    def _fs_path(self, key: str, index: int) -> str:
        return self._fs_join(_check_key(key), f"expert_{_check_index(index):05d}.arrow")

    def path(self, key: str, index: int) -> str:
        """Location of expert ``index`` under ``key`` (a URI for remote stores)."""
        return self._shown(self._fs_path(key, index))

    # -- atomic writes

    def _discard(self, fs_path: str) -> None:
        """Best-effort removal of a temp file after a failed write."""
        try:
            self._fs.delete_file(fs_path)
        except (OSError, pa.ArrowException):
            pass

    def _atomic_write(self, final: str, write_body) -> None:
        """Run ``write_body(stream)`` into ``<final>.tmp-<uuid>``, then move it to ``final``."""
        self._fs.create_dir(posixpath.dirname(final), recursive=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            with self._fs.open_output_stream(tmp) as sink:
                write_body(sink)
            if self._local:  # survive power loss, not just process crashes
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                finally:
                    os.close(fd)
            self._fs.move(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise

    def write(
        self,
        key: str,
        index: int,
        params: np.ndarray,
        meta: dict,
        epochs: Sequence[int] | None = None,
    ) -> str:
        """Atomically store one expert's trajectory; return its path.

        ``params`` is (T, P) float32: row t is the flat parameter vector saved at
        ``epochs[t]`` (default ``0..T-1``). ``meta`` is a JSON dict that readers can check
        with ``open(..., expect=...)``.
        """
        final = self._fs_path(key, index)
        params = _check_params(params)
        rows, count = params.shape
        saved = _check_epochs(epochs, rows)
        if not isinstance(meta, Mapping):
            raise PddError(f"meta must be a dict, got {type(meta).__name__}")
        meta_json = _dumps(_canonical(meta, "meta"))

        fields = [pa.field("epoch", pa.int32(), nullable=False), pa.field("params", pa.list_(pa.float32(), count))]
        schema = pa.schema(fields).with_metadata(
            {
                _META: meta_json.encode("utf-8"),
                _FORMAT: FORMAT_VERSION.encode(),
                _ROWS: str(rows).encode(),
                _EPOCHS: _dumps(saved).encode(),
                _CRC: _dumps([_row_crc([params[t]]) for t in range(rows)]).encode(),
            }
        )

        def body(sink: pa.NativeFile) -> None:
            with ipc.new_file(sink, schema) as writer:
                for t in range(rows):  # one batch per epoch: readers fetch rows independently
                    writer.write_batch(_row_batch(schema, saved[t], params[t]))

        self._atomic_write(final, body)
        return self._shown(final)

    # -- listing

    def exists(self, key: str, index: int) -> bool:
        """True when the final file is present (temp files never count)."""
        return self._fs.get_file_info(self._fs_path(key, index)).type == pafs.FileType.File

    def _listing(self, key: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._fs_join(_check_key(key)), allow_not_found=True)
        return [i for i in self._fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def indices(self, key: str) -> list[int]:
        """Sorted indices of complete expert files under ``key`` ([] if none)."""
        found = []
        for info in self._listing(key):
            m = _FINAL_RE.fullmatch(info.base_name)
            if m and info.base_name == f"expert_{int(m.group(1)):05d}.arrow":
                found.append(int(m.group(1)))
        return sorted(found)

    def lock(self, key: str, timeout: float | None = None) -> AbstractContextManager:
        """Exclusive cross-process lock on ``key`` (a context manager), for its writers.

        Held while a process decides which experts are missing and trains them, so a second
        run with the same experts waits and then finds them present instead of training them
        again (and :meth:`clean_temp` never deletes a live writer's temp file). Local and NFS
        roots lock ``<root>/<key>.lock`` (:mod:`pdd_ray.locks`); object stores cannot lock,
        there concurrent writers both produce complete files and the last move wins.
        """
        if not self._local:
            return nullcontext()
        return file_lock(self._fs_join(_check_key(key)) + ".lock", f"experts {self._shown(self._fs_join(key))}",
                         timeout=timeout)

    def clean_temp(self, key: str) -> int:
        """Delete temp files left by crashed writers under ``key``; return how many.

        Only call this when no writer for ``key`` is running: it cannot tell a crashed
        writer's temp file from one still being written.
        """
        removed = 0
        for info in self._listing(key):
            if _TEMP_RE.fullmatch(info.base_name):
                self._fs.delete_file(info.path)
                removed += 1
        return removed

    # -- reading

    def open(self, key: str, index: int, expect: dict | None = None) -> TrajectoryReader:
        """Open one expert for random access to its epochs.

        ``expect`` maps meta fields to the values this run requires (dataset digest,
        parameter count, model spec...): reusing experts trained for something else would
        silently corrupt distillation, so any mismatch raises.
        """
        fs_path = self._fs_path(key, index)
        shown = self._shown(fs_path)
        if not self.exists(key, index):
            raise PddError(f"trajectory file {shown} does not exist; run `pdd-ray experts` to build it")
        try:
            source = pa.memory_map(fs_path, "r") if self._local else self._fs.open_input_file(fs_path)
        except (OSError, pa.ArrowException) as err:
            raise PddError(f"trajectory file {shown} cannot be opened ({err})") from None
        reader = TrajectoryReader(source, shown, memory_mapped=self._local)
        if expect:
            try:
                reader.check_meta(expect)
            except PddError:
                reader.close()
                raise
        return reader

    # -- JSON side files

    def _fs_rel(self, relpath: str) -> str:
        norm = posixpath.normpath(str(relpath).replace("\\", "/")) if relpath else ""
        if not norm or norm == "." or norm.startswith(("/", "../")) or norm == "..":
            raise PddError(f"side-file path {relpath!r} must be a relative path inside the store root")
        return self._fs_join(norm)

    def write_json(self, relpath: str, obj: dict) -> None:
        """Atomically write a small JSON dict (e.g. a manifest) at ``<root>/<relpath>``."""
        target = self._fs_rel(relpath)
        if not isinstance(obj, Mapping):
            raise PddError(f"write_json({relpath!r}) needs a dict, got {type(obj).__name__}")
        data = json.dumps(_canonical(obj, relpath), sort_keys=True, indent=2).encode("utf-8")
        self._atomic_write(target, lambda sink: sink.write(data))

    def read_json(self, relpath: str) -> dict | None:
        """Read a JSON dict written by :meth:`write_json`; None if it does not exist."""
        target = self._fs_rel(relpath)
        if self._fs.get_file_info(target).type != pafs.FileType.File:
            return None
        with self._fs.open_input_stream(target) as src:
            raw = src.read()
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise PddError(f"JSON file {self._shown(target)} is corrupt ({err}); delete it") from None
        if not isinstance(obj, dict):
            raise PddError(f"JSON file {self._shown(target)} holds a {type(obj).__name__}, expected an object")
        return obj


# --------------------------------------------------------------------------- reader


class TrajectoryReader:
    """Random access to the epochs of one expert file.

    Arrays returned from a memory-mapped (local) file are read-only zero-copy views into
    the mapping; they stay valid after :meth:`close` (Arrow keeps the mapping alive while
    they exist). Copy them before modifying.
    """

    def __init__(self, source: pa.NativeFile, path: str, memory_mapped: bool) -> None:
        self.path = path
        self.memory_mapped = memory_mapped
        self._source = source
        try:
            self._reader = ipc.open_file(source)
            schema = self._reader.schema
            md = schema.metadata or {}
            if _FORMAT not in md:
                self._corrupt("not a pdd_ray trajectory file: no format tag")
            if md[_FORMAT] != FORMAT_VERSION.encode():
                fmt = md[_FORMAT].decode(errors="replace")
                raise PddError(
                    f"trajectory file {path} uses format {fmt!r} but this pdd_ray reads format "
                    f"{FORMAT_VERSION!r}; upgrade pdd_ray or {_REBUILD}"
                )
            self.meta: dict = json.loads(md[_META].decode("utf-8"))
            self.epochs: list[int] = json.loads(md[_EPOCHS].decode("utf-8"))
            self.num_rows: int = int(md[_ROWS])
            params_type = schema.field("params").type
            if schema.field("epoch").type != pa.int32() or not (
                pa.types.is_fixed_size_list(params_type) and params_type.value_type == pa.float32()
            ):
                self._corrupt("unexpected column types")
            self.param_count: int = params_type.list_size
            if self._reader.num_record_batches != self.num_rows or len(self.epochs) != self.num_rows:
                self._corrupt(f"{self._reader.num_record_batches} batches for {self.num_rows} rows")
            # files written before checksums existed have none: they are read unverified
            self._crc: list[int] | None = json.loads(md[_CRC].decode("utf-8")) if _CRC in md else None
            if self._crc is not None and len(self._crc) != self.num_rows:
                self._corrupt(f"{len(self._crc)} checksums for {self.num_rows} rows")
        except PddError:
            source.close()
            raise
        except (pa.ArrowException, OSError, KeyError, ValueError) as err:
            source.close()
            self._corrupt(str(err))
        self._row_of = {e: i for i, e in enumerate(self.epochs)}
        self._verified: set[int] = set()  # rows whose checksum matched: each is checked once per reader
        self._closed = False

    def _corrupt(self, why: str) -> None:
        why = " ".join(why.split())[:200]
        raise PddError(f"trajectory file {self.path} is truncated or corrupt ({why}); {_REBUILD}")

    def check_meta(self, expect: Mapping[str, Any]) -> None:
        """Raise unless every ``expect`` field equals the stored meta (compared as JSON)."""
        for field, wanted in expect.items():
            wanted = json.loads(_dumps(_canonical(wanted, f"expect[{field!r}]")))  # tuples == lists
            if field not in self.meta:
                raise PddError(
                    f"trajectory file {self.path} has no meta field {field!r} (expected {wanted!r}); {_REBUILD}"
                )
            if self.meta[field] != wanted:
                raise PddError(
                    f"trajectory file {self.path} meta field {field!r} is {self.meta[field]!r} but "
                    f"{wanted!r} was expected; it was built for other settings, {_REBUILD}"
                )

    def _batch(self, row: int) -> pa.RecordBatch:
        if self._closed:
            raise PddError(f"trajectory reader for {self.path} is closed; open it again")
        if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
            raise PddError(f"row {row!r} is not an integer; valid rows of {self.path} are 0..{self.num_rows - 1}")
        if not -self.num_rows <= row < self.num_rows:
            raise PddError(
                f"row {row} is out of range for {self.path}: valid rows are 0..{self.num_rows - 1} "
                "(negative counts from the end)"
            )
        row = int(row) % self.num_rows
        try:
            batch = self._reader.get_batch(row)
            stored_epoch = batch.column(0)[0].as_py()
        except (pa.ArrowException, OSError, IndexError) as err:
            self._corrupt(f"row {row}: {err}")
        if batch.num_rows != 1 or stored_epoch != self.epochs[row]:
            self._corrupt(f"row {row} does not match the epoch index")
        if self._crc is not None and row not in self._verified:
            try:
                crc = _row_crc([self._values(batch.column(i)) for i in range(1, batch.num_columns)])
            except (pa.ArrowException, ValueError) as err:
                self._corrupt(f"row {row}: {err}")
            if crc != self._crc[row]:
                self._corrupt(f"row {row} (epoch {self.epochs[row]}) does not match its checksum")
            self._verified.add(row)
        return batch

    @staticmethod
    def _values(arr: pa.FixedSizeListArray) -> np.ndarray:
        return arr.flatten().to_numpy(zero_copy_only=False)

    def params(self, row: int) -> np.ndarray:
        """(P,) float32 parameters saved in ``row`` (zero-copy when memory-mapped)."""
        return self._values(self._batch(row).column(1))

    def params_at_epoch(self, epoch: int) -> np.ndarray:
        """(P,) float32 parameters saved at training epoch ``epoch``."""
        row = self._row_of.get(epoch) if isinstance(epoch, (int, np.integer)) else None
        if row is None:
            shown = self.epochs if len(self.epochs) <= 12 else f"{self.epochs[:6]}...{self.epochs[-3:]}"
            raise PddError(f"epoch {epoch!r} was not saved in {self.path}; saved epochs: {shown}")
        return self.params(row)

    def close(self) -> None:
        """Release the file handle; arrays already returned stay valid."""
        if not self._closed:
            self._closed = True
            self._source.close()

    def __enter__(self) -> TrajectoryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrajectoryReader({self.path!r}, rows={self.num_rows}, params={self.param_count})"
