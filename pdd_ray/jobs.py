"""Run pdd_ray on a remote Ray cluster through the Ray Jobs API (``pdd-ray submit``, ``pdd-ray jobs``).

Why the Jobs API and not ``ray.init("ray://...")``: a job's driver runs *on* the cluster, so a
multi-hour distillation survives the laptop going to sleep, and the cluster's nodes never
need to reach back to the client.

How the code gets there: the working directory (pdd_ray's source tree) is uploaded as the
job's ``runtime_env.working_dir``. Ray puts that directory first on ``PYTHONPATH`` of the
driver and of every worker on every node, so the entrypoint ``python -m pdd_ray run ...``
imports the uploaded code even when an older pdd_ray is installed in the image. Nothing is
pip-installed per job: the cluster image must already hold pdd_ray's dependencies (torch,
pyarrow, mlflow, ...; ``cluster.yaml`` installs them once per node). We do not run
``pip install -e .`` in the entrypoint: it would modify the image's shared environment on the
head only, race with concurrent jobs, and point at a temporary directory Ray deletes later.

Token authentication (Ray >= 2.52): the client first asks the dashboard's public
``/api/authentication_mode`` endpoint whether the cluster wants a token, and only then sends
one, as an ``Authorization: Bearer`` header, taken from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` (Ray's own order). The header is passed
explicitly rather than left to the SDK because the SDK only adds it when ``RAY_AUTH_MODE=token``
is set in the client and caches the token for the life of the process.

Storage: every output lives under the config's ``storage``; the job's driver and workers
resolve it on the cluster, so on a multi-node cluster it must be shared (an NFS mount or an
object store URI such as ``s3://bucket/pdd_ray``); :func:`storage_warning` says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit

from pdd_ray.errors import PddError

if TYPE_CHECKING:  # the Ray SDK is imported lazily: `pdd-ray --help` must stay fast
    from ray.job_submission import JobInfo, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

#: Never uploaded: VCS data, environments, results and datasets (anchored with ``/`` where a
#: bare name would also match a package folder, e.g. ``pdd_ray/data``). Ray also honours the
#: tree's ``.gitignore``.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "/venv",
    "/outputs",
    "/data",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    "mlruns",
)

#: Seconds to wait for the dashboard to answer the first request (the SDK itself never times out).
CONNECT_TIMEOUT_S = 10.0

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


# ----------------------------------------------------------------------------------------------
# Address and token
# ----------------------------------------------------------------------------------------------


def default_address() -> str:
    """``$RAY_ADDRESS`` when it is the dashboard's http(s) form, else the local dashboard.

    A ``RAY_ADDRESS`` like ``10.0.0.1:6379`` names the GCS, not the dashboard; using it for
    HTTP would fail with a confusing error, so it is ignored here.
    """
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def normalize_address(address: str) -> str:
    """Validate a dashboard address; ``HOST:PORT`` gets ``http://``. Raise a one-line PddError.

    Only the http(s) form is accepted: ``ray://`` or a GCS ``HOST:6379`` would need a Ray
    Client connection the Jobs API does not use.
    """
    raw = address.strip()
    if raw and "://" not in raw:
        raw = f"http://{raw}"
    expected = "accepted: the Ray dashboard's http://HOST:PORT (default port 8265)"
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise PddError(f"address '{address}' is malformed; {expected}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or any(c.isspace() for c in host):
        raise PddError(f"address '{address}' is not a dashboard URL; {expected}")
    if parts.query or parts.fragment:
        raise PddError(f"address '{address}' has a query; {expected}")
    # No port is fine behind an ingress/proxy (https://ray.example.com/dashboard); a missing
    # 8265 on a bare head then shows up as "no Ray dashboard answers", which names the address.
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def is_loopback(address: str) -> bool:
    """Whether the address names this machine (the job then shares this machine's disk)."""
    return (urlsplit(address).hostname or "") in _LOOPBACK_HOSTS


def find_token() -> tuple[str, str] | None:
    """``(token, where it came from)`` in Ray's order of precedence, or ``None``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_env:
        path = Path(path_env).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:  # Ray treats this as fatal too, rather than silently falling back
            raise PddError(f"RAY_AUTH_TOKEN_PATH={path_env} is not a readable, non-empty token file")
        return token, f"RAY_AUTH_TOKEN_PATH={path_env}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None


def _token_help(address: str) -> str:
    return (
        f"the cluster at {address} requires an auth token and none was found: set RAY_AUTH_TOKEN, or "
        "RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token "
        "(`ray get-auth-token` on the head node prints it)"
    )


def cluster_auth_mode(address: str) -> str:
    """``"token"`` or ``"disabled"`` (``"unknown"`` for clusters older than Ray 2.52).

    This is also the reachability check: it fails fast with a timeout, where the SDK's own
    requests would hang on an address that silently drops packets.
    """
    import requests

    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__
        raise PddError(
            f"no Ray dashboard answers at {address} ({reason}); start the cluster or pass "
            "--address http://HEAD:8265"
        ) from None
    if r.status_code != 200:
        return "unknown"
    try:
        return str(r.json().get("authentication_mode", "unknown"))
    except ValueError:
        return "unknown"


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Hide ``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS`` while the SDK resolves the address.

    The SDK lets those variables silently override the address it is given; ``--address``
    must win.
    """
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def sdk_errors(address: str, job_id: str | None = None, token_source: str | None = None) -> Iterator[None]:
    """Turn the Jobs SDK's exceptions into one-line :class:`PddError`s."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except PddError:
        raise
    except AuthenticationError:
        if token_source is None:
            raise PddError(_token_help(address)) from None
        raise PddError(
            f"the cluster at {address} rejected the auth token from {token_source}; use the token the "
            "cluster was started with (`ray get-auth-token` on the head node prints it)"
        ) from None
    except (ConnectionError, requests.exceptions.RequestException, aiohttp.ClientError) as exc:
        if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (401, 403):
            raise PddError(_token_help(address)) from None
        raise PddError(f"lost the connection to the Ray dashboard at {address} ({type(exc).__name__})") from None
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise PddError(f"no job '{job_id}' on the cluster at {address}") from None
        if "401" in text or "authentication" in text.lower():
            raise PddError(_token_help(address)) from None
        raise PddError(f"the Ray dashboard at {address} refused the request: {text[:300]}") from None


def quiet_sdk_logs() -> None:
    """Keep the SDK's upload chatter (one INFO line per ignored ``.gitignore``) out of the CLI."""
    import ray.job_submission  # noqa: F401  (its import sets the SDK logger to INFO; override after)

    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)


def connect(address: str) -> JobSubmissionClient:
    """A Jobs SDK client for ``address``, sending the auth token when the cluster requires one."""
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    mode = cluster_auth_mode(address)
    found = find_token() if mode == "token" or os.environ.get("RAY_AUTH_MODE") == "token" else None
    if mode == "token" and found is None:
        raise PddError(_token_help(address))
    headers = {"Authorization": f"Bearer {found[0]}"} if found else {}
    with sdk_errors(address, token_source=found[1] if found else None), _without_address_env():
        return JobSubmissionClient(address, headers=headers)


# ----------------------------------------------------------------------------------------------
# What to upload and run
# ----------------------------------------------------------------------------------------------


def find_source_root(start: Path | None = None) -> Path:
    """pdd_ray's source tree: the first folder up from ``start`` (default: the current one)
    holding ``pyproject.toml`` and ``pdd_ray/``, else the tree the running pdd_ray came from."""
    here = (start or Path.cwd()).resolve()
    package_root = Path(__file__).resolve().parent.parent
    for folder in (here, *here.parents, package_root):
        if (folder / "pyproject.toml").is_file() and (folder / "pdd_ray" / "__init__.py").is_file():
            return folder
    raise PddError(
        f"no pdd_ray source tree (pyproject.toml with pdd_ray/) at or above {here}; pass --working-dir"
    )


def config_for_job(config: str | None, working_dir: Path) -> str | None:
    """The config argument as the job will see it: a preset name, or a path inside the upload.

    The job runs in its own copy of the working directory, so a YAML file outside it would
    not exist on the cluster.
    """
    if config is None:
        return None
    path = Path(config).expanduser()
    if not path.is_file():
        return config  # a preset name; load_config has already checked it exists
    try:
        return path.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise PddError(
            f"config file {config} is outside the uploaded working directory {working_dir}; "
            "move it inside, or pass --working-dir"
        ) from None


def storage_warning(storage: str, address: str) -> str | None:
    """One line when ``storage`` is unlikely to be visible to every node of the cluster.

    Remote object stores (``s3://``, ``gs://``...) are fine; a path is fine on this machine's
    own cluster and must be a shared mount (NFS) on a multi-node one.
    """
    from pdd_ray.storage import is_remote  # pyarrow: imported only when a job is submitted

    if is_remote(storage):
        return None
    if is_loopback(address):
        return None
    if not storage.startswith(("/", "file://")):
        where = "a relative path, so it resolves inside the job's temporary working directory on the head node"
    else:
        where = "a path: every node of the cluster must see it, and workers on other nodes write there too"
    return (
        f"warning: storage '{storage}' is {where}; on a multi-node cluster use a shared location, "
        "e.g. storage=/shared/pdd_ray (NFS) or storage=s3://BUCKET/pdd_ray"
    )


def build_entrypoint(config: str | None, overrides: list[str], progress: bool = False) -> str:
    """``python -m pdd_ray run CONFIG key=value ...``, each argument shell-quoted.

    ``python -m`` rather than the ``pdd-ray`` script: the uploaded code is on ``PYTHONPATH``
    while the script only exists where pdd_ray was pip-installed.
    """
    argv = ["python", "-m", "pdd_ray", "run"]
    argv += [config] if config else []
    argv += list(overrides)
    argv += [] if progress else ["--no-progress"]  # job logs are not a terminal
    return shlex.join(argv)


def runtime_env(working_dir: Path, excludes: list[str]) -> dict:
    """Upload ``working_dir`` (minus excludes); install nothing: the image holds the deps."""
    return {
        "working_dir": str(working_dir),
        "excludes": [*DEFAULT_EXCLUDES, *excludes],
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # log lines reach `pdd-ray submit` as printed
    }


# ----------------------------------------------------------------------------------------------
# Following a job
# ----------------------------------------------------------------------------------------------


class JobFailed(PddError):
    """A job ended FAILED or STOPPED (the CLI exits 1 on it, not 2: the input was fine)."""


def stream_logs(client: JobSubmissionClient, job_id: str, out: TextIO | None = None) -> None:
    """Print the job's logs as they come, until the job ends (to ``sys.stdout`` as it is *now*)."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())


def _failure_reason(info: JobInfo, logs: str) -> str:
    """The most useful single line: pdd-ray's own error line if the job printed one."""
    for line in reversed(logs.splitlines()):
        if line.startswith("pdd-ray: error:"):
            return line[len("pdd-ray: error:") :].strip()
    message = (info.message or "").split("\n", 1)[0]
    return message.split(", last available logs", 1)[0].strip() or "no message"


def wait_for_job(
    client: JobSubmissionClient, job_id: str, address: str, follow: bool = True, poll_s: float = 1.0
) -> JobInfo:
    """Follow (or poll) a job to its end; return its info if it SUCCEEDED, else raise :class:`JobFailed`."""
    from ray.job_submission import JobStatus

    with sdk_errors(address, job_id):
        if follow:
            stream_logs(client, job_id)
        info = client.get_job_info(job_id)
        while not info.status.is_terminal():
            time.sleep(poll_s)
            info = client.get_job_info(job_id)
        if info.status == JobStatus.SUCCEEDED:
            return info
        logs = client.get_job_logs(job_id) if info.status == JobStatus.FAILED else ""
    raise JobFailed(f"job {job_id} {info.status.value}: {_failure_reason(info, logs)}")


# ----------------------------------------------------------------------------------------------
# CLI handlers
# ----------------------------------------------------------------------------------------------


def _fail(err: JobFailed) -> int:
    """Print a failed job the way the CLI prints errors, but exit 1 (see :class:`JobFailed`)."""
    print(f"pdd-ray: error: {err}", file=sys.stderr)
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    """``pdd-ray submit``: validate the config here, upload the tree, run it there."""
    from pdd_ray.config import absolute_storage, load_config, split_config_and_overrides

    config, overrides = split_config_and_overrides(args.config, args.overrides)
    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)):
        if value is not None and value < 0:
            raise PddError(f"{flag} {value} is negative; pass 0 or more")
    address = normalize_address(args.address)
    quiet_sdk_logs()
    cfg = load_config(config, overrides)  # bad input fails here, before anything is uploaded
    working_dir = Path(args.working_dir).expanduser().resolve() if args.working_dir else find_source_root()
    if not working_dir.is_dir():
        raise PddError(f"--working-dir {args.working_dir} is not a directory")
    job_config = config_for_job(config, working_dir)
    storage = cfg.storage
    if "://" not in storage and not Path(storage).is_absolute() and is_loopback(address):
        # Same machine: resolve like `pdd-ray run` would, not inside the job's temporary copy.
        overrides.append(f"storage={absolute_storage(storage)}")
        storage = absolute_storage(storage)
    warning = storage_warning(storage, address)
    if warning:
        print(warning, file=sys.stderr)

    client = connect(address)
    progress = args.progress and not getattr(args, "no_progress", False)  # --no-progress wins
    entrypoint = build_entrypoint(job_config, overrides, progress=progress)
    with sdk_errors(address):
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env(working_dir, list(args.exclude)),
                entrypoint_num_cpus=args.num_cpus,
                entrypoint_num_gpus=args.num_gpus,
                metadata={"pdd_ray": "run", "config": job_config or "digits", "name": cfg.name},
            )
        except ValueError as exc:  # e.g. the upload is over Ray's size limit
            raise PddError(f"cannot package {working_dir}: {' '.join(str(exc).split())[:300]}; "
                           "add --exclude PATTERN for large files") from None
    print(f"submitted job {job_id} to {address}")
    print(f"  storage: {storage}")
    if args.no_wait:
        print(f"  follow it: pdd-ray jobs logs {job_id} --follow --address {address}")
        return 0
    try:
        wait_for_job(client, job_id, address)
    except JobFailed as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"\npdd-ray: stopped following; job {job_id} keeps running "
              f"(pdd-ray jobs stop {job_id} --address {address})", file=sys.stderr)
        return 130
    print(f"job {job_id} SUCCEEDED")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """``pdd-ray jobs status|logs|stop JOB_ID``."""
    address = normalize_address(args.address)
    quiet_sdk_logs()
    client = connect(address)
    job_id = args.job_id
    if args.action == "status":
        with sdk_errors(address, job_id):
            info = client.get_job_info(job_id)
        message = (info.message or "").split("\n", 1)[0]
        print(f"{job_id} {info.status.value}" + (f": {message}" if message else ""))
        return 0
    if args.action == "logs":
        if not args.follow:
            with sdk_errors(address, job_id):
                sys.stdout.write(client.get_job_logs(job_id))
            return 0
        try:
            info = wait_for_job(client, job_id, address)
        except JobFailed as err:
            return _fail(err)
        print(f"job {job_id} {info.status.value}")
        return 0
    with sdk_errors(address, job_id):
        stopped = client.stop_job(job_id)
    print(f"stop requested for job {job_id}" if stopped else f"job {job_id} had already finished")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs`` to the ``pdd-ray`` parser."""
    address_help = f"Ray dashboard address (default: $RAY_ADDRESS if http(s)://..., else {DEFAULT_ADDRESS})"

    p = sub.add_parser(
        "submit",
        help="run a config on a Ray cluster as a Ray job (uploads this source tree)",
        description="Validate the config locally, upload pdd_ray's source tree as the job's working "
        "directory, run `python -m pdd_ray run CONFIG key=value ...` on the cluster, stream its logs and "
        "exit 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED. The cluster image must already have "
        "pdd_ray's dependencies; `storage` must be shared (NFS path or s3://...) on multi-node clusters.",
    )
    p.add_argument("config", nargs="?", default=None, help="preset name or YAML file inside the working dir")
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help="config overrides")
    p.add_argument("--address", default=default_address(), help=address_help)
    p.add_argument("--working-dir", default=None, help="folder to upload (default: the pdd_ray source tree)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="gitignore-style pattern not to upload (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--progress", action="store_true", help="keep progress bars in the job's logs")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser(
        "jobs",
        help="status, logs or stop of a submitted job",
        description="Inspect or stop a job submitted with `pdd-ray submit`.",
    )
    p.add_argument("action", choices=["status", "logs", "stop"], help="what to do")
    p.add_argument("job_id", help="the id `pdd-ray submit` printed (raysubmit_...)")
    p.add_argument("--address", default=default_address(), help=address_help)
    p.add_argument("--follow", action="store_true", help="logs: keep streaming until the job ends")
    p.set_defaults(handler=cmd_jobs)
