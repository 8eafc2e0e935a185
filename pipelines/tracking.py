"""MLflow tracking: the embedded tracking server and the run helpers the training side uses.

Embedded server
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

    Ray workers inherit the environment of the process that started the local Ray instance,
    and the URI is set only once the server answers. ``tpr train``, ``tpr sweep`` and the demo
    start Ray while the server boots (``while_starting=init_ray``, about 10 s saved on 2
    cores) and hand the yielded URI to their workers in the train loop's config. Other code
    that starts Ray inside the block gets the URI from the environment.

Run helpers
    Rank 0 only. A run is identified by the tag ``tpr.run_key``: :func:`start_or_resume_run`
    finds the run carrying the key, so a restarted worker group or a resumed command continues
    the same MLflow run instead of opening a second one. Metrics are logged with explicit steps
    (:func:`log_metrics`); after a restart the caller asks :func:`last_logged_step` and skips
    the steps that are already there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipelines.env import scoped_env

RUN_KEY_TAG = "tpr.run_key"
PARENT_RUN_TAG = "mlflow.parentRunId"
BEST_TRIAL_TAG = "tpr.best_trial_run_id"  # on a sweep's parent run: the run id of its best trial

_SERVER_START_TIMEOUT_S = 180.0
_SERVER_STOP_GRACE_S = 20.0
_LOG_TAIL_LINES = 40


class TrackingServerError(RuntimeError):
    """The embedded MLflow server did not come up (the message carries its log tail)."""


# --------------------------------------------------------------------------- server


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
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=5.0)


def _seed_store(db: Path) -> None:
    """Start a new store from a copy of an empty, fully migrated one.

    Creating the schema runs MLflow's whole chain of database migrations, tens of seconds on a
    2-core machine, for every new runs folder (every test, every fresh demo). The empty store
    is made once per machine and MLflow version under ``~/.cache/tpr`` (``TPR_CACHE_DIR``)
    and copied, which takes milliseconds; the server then finds the schema current.
    """
    if db.exists():
        return
    from importlib import metadata

    cache = Path(os.environ.get("TPR_CACHE_DIR", Path.home() / ".cache" / "tpr"))
    template = cache / f"mlflow-{metadata.version('mlflow')}-empty.db"
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
            [sys.executable, "-c", code, _sqlite_uri(tmp), str(cache / "empty-artifacts")],
            capture_output=True, text=True, timeout=900,
        )
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise TrackingServerError(f"could not create an empty MLflow store: {r.stderr[-2000:]}")
        os.replace(tmp, template)
    shutil.copyfile(template, db)


@contextlib.contextmanager
def tracking_server(
    runs_dir: str | Path,
    timeout_s: float = _SERVER_START_TIMEOUT_S,
    while_starting: Callable[[], None] | None = None,
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

    Yields:
        The tracking URI (``http://127.0.0.1:PORT`` or the one from the environment).

    Raises:
        TrackingServerError: The server exited or did not answer in time; the message carries
            the tail of ``runs_dir/mlflow/server.log``.
    """
    preset = os.environ.get("MLFLOW_TRACKING_URI")
    if preset:
        if while_starting is not None:
            while_starting()
        yield preset
        return

    base = Path(runs_dir).resolve() / "mlflow"
    artifacts = base / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = base / "server.log"

    _seed_store(base / "mlflow.db")
    env = dict(os.environ)
    # The server's GenAI job runner is a further process we do not need on a small machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"

    proc: subprocess.Popen | None = None
    url = ""
    # A port found free can be taken before the server binds it; retry a few times.
    for _attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-c", _GUARD, str(os.getpid()),
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", _sqlite_uri(base / "mlflow.db"),
            "--artifacts-destination", str(artifacts),
            "--serve-artifacts",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            log.write(f"\n=== tpr: starting {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: the whole group (CLI + uvicorn) can be signalled at once.
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        if while_starting is not None:
            try:
                while_starting()
            except BaseException:
                _stop_group(proc)
                raise
            while_starting = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not _healthy(url):
            time.sleep(0.25)
        if proc.poll() is None and _healthy(url):
            break
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
    else:
        raise TrackingServerError(
            f"MLflow server could not bind a free port; log {log_path}:\n{_log_tail(log_path)}"
        )

    assert proc is not None
    try:
        with scoped_env(MLFLOW_TRACKING_URI=url):
            yield url
    finally:
        _stop_group(proc)


# --------------------------------------------------------------------------- runs


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def get_or_create_experiment(name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when two callers race)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        # Someone else created it between our look-up and our create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _check_key(run_key: str) -> None:
    if not run_key or "'" in run_key or '"' in run_key or "\\" in run_key:
        raise ValueError(f"run_key {run_key!r} must be non-empty and free of quotes and backslashes")


def find_run(experiment: str, run_key: str) -> str | None:
    """The id of the oldest live run of ``experiment`` tagged ``tpr.run_key == run_key``, if any."""
    _check_key(run_key)
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=100
    )
    if not runs:
        return None
    # Oldest first, id as tie-break, so that every caller picks the same run.
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def start_or_resume_run(
    experiment: str,
    run_key: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Continue the run tagged ``tpr.run_key == run_key`` in ``experiment``, or create it.

    A resumed run is set back to ``RUNNING``. Should two callers create the same key at once,
    both converge on the oldest run and the newer duplicate is deleted.

    Args:
        experiment: Experiment name (created if missing).
        run_key: Stable identity of the training (e.g. the Ray run name); no quotes.
        run_name: Display name of a new run.
        tags: Extra tags for a new run (also set again on a resumed one).
        parent_run_id: Makes the new run a child (``mlflow.parentRunId``) of this run.

    Returns:
        The run id.
    """
    client = _client()
    exp_id = get_or_create_experiment(experiment)
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    found = find_run(experiment, run_key)
    if found is not None:
        run = client.get_run(found)
        if run.info.status != "RUNNING":
            client.update_run(found, status="RUNNING")
        for k, v in all_tags.items():
            if run.data.tags.get(k) != v:
                client.set_tag(found, k, v)
        return found
    all_tags[RUN_KEY_TAG] = run_key
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    winner = find_run(experiment, run_key)
    if winner is not None and winner != run.info.run_id:
        client.delete_run(run.info.run_id)
        return winner
    return run.info.run_id


def _param_value(value: Any) -> str:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        # MLflow refuses longer values; keep the head and say that it was cut.
        marker = "...[truncated]"
        text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return text


def log_params_flat(run_id: str, params: Mapping[str, Any]) -> int:
    """Log a (possibly nested) parameter dict as dotted keys, idempotently.

    Nested dicts are flattened (``{"loss": {"weights": {"id": 1}}}`` -> ``loss.weights.id``).
    Values are stringified and cut to MLflow's length limit. Parameters already logged on the
    run with the same value are skipped, so a resumed run can log its config again.

    Args:
        run_id: Target run.
        params: Parameters (nested or dotted).

    Returns:
        The number of parameters actually sent.

    Raises:
        ValueError: A parameter is already logged with a different value (MLflow forbids the
            change); the message names the key and both values.
    """
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

    from tpr_core.config import flatten

    client = _client()
    existing = client.get_run(run_id).data.params
    todo: list[Param] = []
    for key, value in flatten(dict(params)).items():
        text = _param_value(value)
        old = existing.get(key)
        if old is None:
            todo.append(Param(key, text))
        elif old != text:
            raise ValueError(
                f"run {run_id}: param {key!r} is already logged as {old!r}; cannot change it to {text!r} "
                "(a resumed run must keep its config; start a new run key instead)"
            )
    for i in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=todo[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
    return len(todo)


def log_metrics(
    run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None
) -> None:
    """Log scalar metrics at an explicit step through ``log_batch`` (one request per 1000 values).

    Args:
        run_id: Target run.
        metrics: Metric key -> value (e.g. ``{"train/loss": 1.2, "val/R1": 43.0}``).
        step: The step all values belong to (the caller owns the step counter).
        timestamp_ms: Wall-clock time of the values; now when omitted.
    """
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    batch = [Metric(str(k), float(v), ts, int(step)) for k, v in metrics.items()]
    client = _client()
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH], synchronous=True)


def last_logged_step(run_id: str, key: str) -> int | None:
    """The largest step at which ``key`` was logged on the run, or None if never."""
    history = _client().get_metric_history(run_id, key)
    return max((m.step for m in history), default=None)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file, or a folder's contents, under ``artifact_path`` of the run."""
    path = Path(path)
    client = _client()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"artifact to log not found: {path}")


def set_terminated(run_id: str, status: str = "FINISHED") -> None:
    """End a run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    _client().set_terminated(run_id, status=status)
