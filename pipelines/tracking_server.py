"""The embedded MLflow tracking server, started for the duration of a command.

:func:`tracking_server` starts a real ``mlflow server`` on loopback for the duration of a
command (``tpr train``, ``tpr sweep``, ``tpr demo``). Several Ray workers and trials log at
once; pointing each of them at a SQLite file directly would make them fight over the
database lock, whereas one server process serialises the writes. Artifacts are proxied
(``--serve-artifacts``), so a client in any process uploads over HTTP and never needs the
artifact folder mounted.

Layout under ``runs_dir``::

    mlflow/mlflow.db      backend + registry store (SQLite)
    mlflow/artifacts/     artifact store behind the proxy
    mlflow/server.log     the server's stdout and stderr

When ``MLFLOW_TRACKING_URI`` is already set (a shared team server, a cluster deployment),
it wins and nothing is started.

Commands that only read (``tpr search``, ``tpr evaluate``, ``tpr models``, ``tpr promote
--dry-run``) start no server: :func:`read_store` points MLflow at the SQLite file itself and
reads the proxied artifacts (``mlflow-artifacts:/...``) from the folder beside it
(:func:`direct_artifact_uri`). Neither it nor ``tracking_server(create=False)`` (``tpr
promote``, ``tpr rollback``) creates a store where there is none: :class:`NoStoreError` names
the path instead.

Ray workers inherit the environment of the process that started the local Ray instance,
and the URI is set only once the server answers. ``tpr train``, ``tpr sweep`` and the demo
start Ray while the server boots (``while_starting=init_ray``, about 10 s saved on 2
cores) and hand the yielded URI to their workers in the train loop's config. Other code
that starts Ray inside the block gets the URI from the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.env import scoped_env

_SERVER_START_TIMEOUT_S = 180.0
_SERVER_STOP_GRACE_S = 20.0
_LOG_TAIL_LINES = 40
_BIND_ATTEMPTS = 3
# The default artifact root of `mlflow server --serve-artifacts`: clients upload through the server.
_PROXIED_ARTIFACT_ROOT = "mlflow-artifacts:/"


class TrackingServerError(RuntimeError):
    """The embedded MLflow server did not come up (the message carries its log tail)."""


class NoStoreError(TrackingServerError):
    """A command that needs an existing store found none (it never creates one)."""


# The artifact folder of the store that read_store opened, in this context (None: not reading directly).
_DIRECT_ARTIFACTS: contextvars.ContextVar[Path | None] = contextvars.ContextVar("tpr_direct_artifacts", default=None)


def _db_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir).resolve() / "mlflow" / "mlflow.db"


def _sqlite_uri(path: Path) -> str:
    # sqlite:/// + an absolute path gives four slashes on POSIX, as SQLAlchemy expects.
    return f"sqlite:///{path}"


def store_uri_for_ui(runs_dir: str | Path) -> str:
    """The command that opens the MLflow UI on the embedded store after a run.

    Args:
        runs_dir: The run directory given to :func:`tracking_server`.

    Returns:
        A shell command line such as ``mlflow ui --backend-store-uri sqlite:////abs/runs/mlflow/mlflow.db
        --artifacts-destination /abs/runs/mlflow/artifacts``.
    """
    base = Path(runs_dir).resolve() / "mlflow"
    return (
        f"mlflow ui --backend-store-uri {_sqlite_uri(_db_path(runs_dir))} "
        f"--artifacts-destination {base / 'artifacts'}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no server log>"
    return "\n".join(text.splitlines()[-lines:])


def _healthy(url: str) -> bool:
    # No proxies: the server is on loopback, and an ambient http_proxy must not intercept it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# Runs the server as its child and ends the whole group when the process that started it is
# gone (a driver killed with SIGKILL or by the OOM killer leaves no server behind).
_GUARD = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
while server.poll() is None:
    time.sleep(1.0)
    if os.getppid() != parent:
        os.killpg(0, signal.SIGTERM)
sys.exit(server.returncode)
"""


def _stop_group(proc: subprocess.Popen, grace_s: float = _SERVER_STOP_GRACE_S) -> None:
    """SIGTERM the server's process group (mlflow CLI + uvicorn), SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The CLI may have exited while uvicorn children are still shutting down: wait for the group.
    if not _group_gone(proc.pid, grace_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _group_gone(proc.pid, 5.0)  # SIGKILL is delivered asynchronously: return once it is gone
    if proc.poll() is None:
        proc.wait(timeout=5.0)


def _group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for process group ``pgid`` to have no process left."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _seed_store(db: Path) -> None:
    """Start a new store from a copy of an empty, fully migrated one.

    Creating the schema runs MLflow's whole chain of database migrations, tens of seconds on a
    2-core machine, for every new runs folder (every test, every fresh demo). The empty store
    is made once per machine and MLflow version under ``~/.cache/tpr`` (``TPR_CACHE_DIR``)
    and copied, which takes milliseconds; the server then finds the schema current.

    Its ``Default`` experiment stores artifacts where a fresh server would put them, behind the
    artifact proxy (``mlflow-artifacts:/0``), never in the cache folder the template was made in.
    """
    if db.exists():
        return
    from importlib import metadata

    cache = Path(os.environ.get("TPR_CACHE_DIR", Path.home() / ".cache" / "tpr"))
    # "proxied": made with the server's artifact root (templates of older tpr versions were not)
    template = cache / f"mlflow-{metadata.version('mlflow')}-empty-proxied.db"
    if not template.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{template.name}.tmp-{os.getpid()}"
        code = (
            "import sys\n"
            "from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore\n"
            "from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry\n"
            "SqlAlchemyStore(sys.argv[1], sys.argv[2]); Registry(sys.argv[1])\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, _sqlite_uri(tmp), _PROXIED_ARTIFACT_ROOT],
            capture_output=True, text=True, timeout=900,
        )
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise TrackingServerError(f"could not create an empty MLflow store: {r.stderr[-2000:]}")
        os.replace(tmp, template)
    shutil.copyfile(template, db)


def _spawn(base: Path, port: int, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``mlflow server`` on ``127.0.0.1:port`` under the guard, in its own session."""
    cmd = [
        sys.executable, "-c", _GUARD, str(os.getpid()),
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", _sqlite_uri(base / "mlflow.db"),
        "--artifacts-destination", str(base / "artifacts"),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        log.write(f"\n=== tpr: starting {' '.join(cmd)}\n".encode())
        log.flush()
        # Own session: the whole group (CLI + uvicorn) can be signalled at once.
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Poll ``/health`` until it answers, the server exits or ``timeout_s`` passes; True if it answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not _healthy(url):
        time.sleep(0.25)
    return proc.poll() is None and _healthy(url)


def _start(
    base: Path, timeout_s: float, while_starting: Callable[[], None] | None
) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port and wait until it answers; returns the process and its URL.

    ``while_starting`` runs once, right after the first spawn; the server is stopped if it raises.
    """
    log_path = base / "server.log"
    env = dict(os.environ)
    # The server's GenAI job runner is a further process we do not need on a small machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # A port found free can be taken before the server binds it; retry a few times.
    for _attempt in range(_BIND_ATTEMPTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _spawn(base, port, log_path, env)
        if while_starting is not None:
            try:
                while_starting()
            except BaseException:
                _stop_group(proc)
                raise
            while_starting = None
        if _wait_healthy(proc, url, timeout_s):
            return proc, url
        exited = proc.poll() is not None
        _stop_group(proc)
        tail = _log_tail(log_path)
        if exited and ("address already in use" in tail.lower() or "errno 98" in tail.lower()):
            continue
        reason = (
            f"exited with code {proc.returncode}"
            if exited
            else f"did not answer {url}/health in {timeout_s:.0f}s"
        )
        raise TrackingServerError(f"MLflow server {reason}; log {log_path}:\n{tail}")
    raise TrackingServerError(
        f"MLflow server could not bind a free port; log {log_path}:\n{_log_tail(log_path)}"
    )


def _existing_db(runs_dir: str | Path) -> Path:
    """The store's database under ``runs_dir``; :class:`NoStoreError` naming it when it is absent."""
    db = _db_path(runs_dir)
    if not db.is_file():
        raise NoStoreError(
            f"no MLflow store at {db} (nothing was trained or registered with --runs-dir {runs_dir}); "
            "give the --runs-dir that `tpr train` used, or set MLFLOW_TRACKING_URI"
        )
    return db


@contextlib.contextmanager
def read_store(runs_dir: str | Path) -> Iterator[str]:
    """Read the store under ``runs_dir`` directly, without a server, for the duration of the block.

    ``MLFLOW_TRACKING_URI``, when set, wins and is yielded unchanged. Otherwise MLflow reads the
    SQLite file (``MLFLOW_TRACKING_URI`` is set to it inside the block, restored afterwards) and
    :func:`direct_artifact_uri` maps the server's proxied artifact URIs to the local folder.

    Raises:
        NoStoreError: There is no store under ``runs_dir``; nothing is created.
    """
    preset = os.environ.get("MLFLOW_TRACKING_URI")
    if preset:
        yield preset
        return
    db = _existing_db(runs_dir)
    uri = _sqlite_uri(db)
    token = _DIRECT_ARTIFACTS.set(db.parent / "artifacts")
    try:
        with scoped_env(MLFLOW_TRACKING_URI=uri):
            yield uri
    finally:
        _DIRECT_ARTIFACTS.reset(token)


def direct_artifact_uri(uri: str) -> str:
    """The URI to download ``uri`` from: unchanged, unless :func:`read_store` reads a store directly.

    Then ``models:/...`` and ``runs:/...`` are resolved through the store to where the artifacts
    lie, and the server's proxied ``mlflow-artifacts:/PATH`` becomes the local folder
    ``mlflow/artifacts/PATH`` (refused if it leads outside that folder).
    """
    root = _DIRECT_ARTIFACTS.get()
    if root is None:
        return uri
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if uri.startswith("models:/"):
        uri = ModelsArtifactRepository.get_underlying_uri(uri)
    elif uri.startswith("runs:/"):
        uri = RunsArtifactRepository.get_underlying_uri(uri)
    if not uri.startswith("mlflow-artifacts:"):
        return uri
    from urllib.parse import unquote, urlparse

    path = (root / unquote(urlparse(uri).path).lstrip("/")).resolve()
    if not path.is_relative_to(root.resolve()):
        raise TrackingServerError(f"artifact URI {uri} leads outside the store's artifact folder {root}")
    return str(path)


@contextlib.contextmanager
def tracking_server(
    runs_dir: str | Path,
    timeout_s: float = _SERVER_START_TIMEOUT_S,
    while_starting: Callable[[], None] | None = None,
    create: bool = True,
) -> Iterator[str]:
    """Run an MLflow tracking server on loopback for the duration of the block.

    If ``MLFLOW_TRACKING_URI`` is set, it is yielded unchanged and nothing is started. Otherwise
    a ``mlflow server`` subprocess (1 uvicorn worker, SQLite backend, proxied artifacts) is
    started on ``127.0.0.1`` and a free port, ``MLFLOW_TRACKING_URI`` points at it inside the
    block (restored afterwards), and the server's process group is stopped on exit, exceptions
    included.

    Args:
        runs_dir: Run directory; the store lives under ``runs_dir/mlflow/``.
        timeout_s: How long to wait for ``/health`` before giving up.
        while_starting: Called once, while the server boots (it takes seconds), before the
            block; for other start-up work such as ``ray.init``. It runs before
            ``MLFLOW_TRACKING_URI`` is set, so processes it starts do not inherit the URI:
            hand it to them explicitly.
        create: Create the store when there is none (False: :class:`NoStoreError` instead).

    Yields:
        The tracking URI (``http://127.0.0.1:PORT`` or the one from the environment).

    Raises:
        TrackingServerError: The server exited or did not answer in time; the message carries
            the tail of ``runs_dir/mlflow/server.log``.
        NoStoreError: ``create`` is False and there is no store under ``runs_dir``.
    """
    preset = os.environ.get("MLFLOW_TRACKING_URI")
    if preset:
        if while_starting is not None:
            while_starting()
        yield preset
        return

    if not create:
        _existing_db(runs_dir)
    base = Path(runs_dir).resolve() / "mlflow"
    (base / "artifacts").mkdir(parents=True, exist_ok=True)
    _seed_store(base / "mlflow.db")
    proc, url = _start(base, timeout_s, while_starting)
    try:
        with scoped_env(MLFLOW_TRACKING_URI=url):
            yield url
    finally:
        _stop_group(proc)
