"""Creating the default MLflow sqlite store once, safely, before any run logs into it.

Why: MLflow creates and migrates a sqlite store the first time a process opens it, with
alembic migrations that are not safe to run twice at once. Two ``pdd-ray run`` started
together both migrated the same new ``mlflow.db``: both failed (``table _alembic_tmp_metrics
already exists``, ``Online migration expected to match one row``) and the half-migrated file
then broke every later run. :func:`ensure_store` opens the store under a file lock
(:mod:`pdd_ray.locks`) so exactly one process creates it, and refuses a store left
half-migrated by such a crash with one line that says how to get a working one again.
Servers (``http://``) and other databases are left to MLflow.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pdd_ray.errors import PddError
from pdd_ray.locks import file_lock

__all__ = ["ensure_store", "sqlite_path"]

_SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers, in-memory and other databases)."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri.removeprefix(_SQLITE).split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _head_revision() -> str | None:
    """MLflow's current schema revision (None if this MLflow hides it: then only leftovers count)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - a private helper; its absence only weakens the check
        return None


def _half_migrated(db: Path) -> str | None:
    """Why ``db`` looks half-created or half-migrated (None when it looks whole, old or new).

    Read with the standard library only: opening it through MLflow would try to migrate it.
    A store at MLflow's current revision is whole. Below it, tables left by an interrupted
    alembic batch migration (``_alembic_tmp_*``), or tables without a schema version, mean a
    crashed creation; a clean older revision is an older MLflow's store (MLflow says
    ``mlflow db upgrade`` for it).
    """
    if not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            versions = [r[0] for r in con.execute("SELECT version_num FROM alembic_version")] if "alembic_version" in tables else []
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        return f"it is not a readable sqlite database: {err}"
    if not tables:
        return None  # an empty file: MLflow fills it
    version = versions[0] if len(versions) == 1 else None
    if version is not None and version == _head_revision():
        return None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        return f"an interrupted migration left table {leftovers[0]} at schema version {version}"
    if version is None:
        return "it has tables but no single schema version"
    return None


def ensure_store(uri: str, artifact_root: str | None = None) -> None:
    """Make sure the MLflow store at ``uri`` exists and is at MLflow's current schema.

    A new sqlite store is created with its "Default" experiment's artifacts under
    ``artifact_root`` when given (the storage root), not in ``./mlruns`` of whatever directory
    the first process happened to run in (what ``MlflowClient`` does when it creates the store).

    For a sqlite file the store is opened (created and migrated when new) under the lock file
    ``<db>.lock``, so concurrent runs create it exactly once; afterwards every process only
    verifies the schema. A half-migrated or otherwise unusable store is a :class:`PddError`
    naming the fix. Any other URI is left alone (MLflow servers migrate their own store).
    """
    db = sqlite_path(uri)
    if db is None:
        return
    with file_lock(db.with_name(db.name + ".lock"), f"the MLflow store {db}", quiet=True):
        why = _half_migrated(db)
        if why is not None:
            raise PddError(f"MLflow store {db} is half-created or damaged ({why}), probably by runs that created it "
                           f"at the same time with an older pdd_ray; move it aside (mv {db} {db}.broken) and re-run: "
                           "a fresh store is created (distilled results under runs/ are kept)")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            if artifact_root is not None and not (db.is_file() and db.stat().st_size > 0):
                from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

                SqlAlchemyStore(uri, artifact_root).engine.dispose()  # tables + experiment 0 under artifact_root
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates/verifies the store
        except MlflowException as err:
            msg = " ".join(str(err).split())
            if "out-of-date database schema" in msg:
                raise PddError(f"MLflow store {db} was made by another MLflow version ({msg[:160]}); back it up, then "
                               f"run `mlflow db upgrade {uri}`") from None
            raise PddError(f"MLflow store {db} cannot be opened ({msg[:200]}); move it aside "
                           f"(mv {db} {db}.broken) and re-run") from None
        except Exception as err:  # noqa: BLE001 - sqlalchemy errors: a damaged file
            msg = " ".join(str(err).split())
            raise PddError(f"MLflow store {db} cannot be opened ({type(err).__name__}: {msg[:200]}); move it aside "
                           f"(mv {db} {db}.broken) and re-run") from None
