"""The embedded MLflow tracking server (``pipelines.tracking_server``) and the run helpers
(``pipelines.tracking``), against a real server on loopback."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from pipelines import tracking  # noqa: E402
from pipelines.tracking_server import (  # noqa: E402
    TrackingServerError,
    _healthy,
    store_uri_for_ui,
    tracking_server,
)


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server for the whole module (startup costs seconds)."""
    runs = tmp_path_factory.mktemp("runs")
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with tracking_server(runs) as uri:
            yield uri, runs
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old


def test_server_layout_and_env(server):
    uri, runs = server
    assert uri.startswith("http://127.0.0.1:")
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert (runs / "mlflow" / "mlflow.db").is_file()
    assert (runs / "mlflow" / "server.log").is_file()
    # Artifacts go through the proxy into runs/mlflow/artifacts.
    run_id = tracking.start_or_resume_run("layout", "layout-key", run_name="layout")
    f = runs / "hello.txt"
    f.write_text("hi")
    tracking.log_artifact(run_id, f, "notes")
    stored = list((runs / "mlflow" / "artifacts").rglob("hello.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hi"
    assert mlflow.MlflowClient().get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")


def test_start_or_resume_same_key_same_run(server):
    first = tracking.start_or_resume_run("resume", "job-1", run_name="a", tags={"x": "1"})
    tracking.set_terminated(first, "FAILED")
    again = tracking.start_or_resume_run("resume", "job-1", run_name="a")
    other = tracking.start_or_resume_run("resume", "job-2", run_name="b")
    assert again == first
    assert other != first
    run = mlflow.MlflowClient().get_run(first)
    assert run.info.status == "RUNNING"  # resumed
    assert run.data.tags[tracking.RUN_KEY_TAG] == "job-1"
    assert run.data.tags["x"] == "1"


def test_child_run_has_parent_tag(server):
    parent = tracking.start_or_resume_run("nested", "sweep-1")
    child = tracking.start_or_resume_run("nested", "trial-1", parent_run_id=parent)
    assert mlflow.MlflowClient().get_run(child).data.tags[tracking.PARENT_RUN_TAG] == parent


def test_params_flat_idempotent_and_conflict(server):
    run_id = tracking.start_or_resume_run("params", "p-1")
    params = {"optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "method": "irra", "long": "x" * 7000}
    assert tracking.log_params_flat(run_id, params) == 4
    # Resume: same values are skipped, nothing is sent.
    assert tracking.log_params_flat(run_id, params) == 0
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    assert logged["optim.lr"] == "0.001"
    assert logged["optim.betas"] == "[0.9, 0.999]"
    assert len(logged["long"]) == 6000 and logged["long"].endswith("[truncated]")
    with pytest.raises(ValueError, match="optim.lr"):
        tracking.log_params_flat(run_id, {"optim.lr": 0.5})


def test_metrics_steps_roundtrip(server):
    run_id = tracking.start_or_resume_run("metrics", "m-1")
    assert tracking.last_logged_step(run_id, "train/loss") is None
    for step in range(5):
        tracking.log_metrics(run_id, {"train/loss": 10.0 - step, "val/R1": step * 2.5}, step=step)
    hist = sorted(mlflow.MlflowClient().get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(s, 10.0 - s) for s in range(5)]
    assert tracking.last_logged_step(run_id, "val/R1") == 4


def _hammer(uri: str, run_id: str, worker: int, n: int, queue) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        for step in range(n):
            tracking.log_metrics(
                run_id, {f"w{worker}/a": float(step), f"w{worker}/b": -float(step)}, step=step
            )
        queue.put((worker, None))
    except Exception as e:  # reported to the parent, which fails the test with it
        queue.put((worker, repr(e)))


def test_two_processes_log_concurrently(server):
    uri, _ = server
    run_id = tracking.start_or_resume_run("concurrent", "c-1")
    # fork: the children start with mlflow already imported (Ray workers are separate processes too).
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    n = 50
    procs = [ctx.Process(target=_hammer, args=(uri, run_id, w, n, queue)) for w in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(err is None for _, err in results), results
    client = mlflow.MlflowClient()
    for w in range(2):
        steps = sorted(m.step for m in client.get_metric_history(run_id, f"w{w}/a"))
        assert steps == list(range(n))
        assert sorted(m.value for m in client.get_metric_history(run_id, f"w{w}/b")) == sorted(
            -float(s) for s in range(n)
        )


def test_env_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:1234")
    calls = []
    with tracking_server(tmp_path, while_starting=lambda: calls.append(1)) as uri:
        assert uri == "http://example.invalid:1234"
        assert calls == [1]
    assert not (tmp_path / "mlflow").exists()  # nothing was started or created


def _wait_until(check, timeout: float = 20.0) -> bool:
    """Poll ``check`` every 0.05 s until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _processes_naming(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (read from /proc, Linux)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def test_while_starting_runs_once_while_the_server_boots(tmp_path, monkeypatch):
    """The callback runs after the server was spawned and before the block, without the URI in
    the environment; the server then answers as usual."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = str(tmp_path / "mlflow" / "mlflow.db")
    seen = []

    def during() -> None:
        # spawned: visible in /proc once the child has exec'd (bounded wait, see below)
        seen.append((os.environ.get("MLFLOW_TRACKING_URI"), _wait_until(lambda: bool(_processes_naming(db)))))

    with tracking_server(tmp_path, while_starting=during) as uri:
        assert seen == [(None, True)]  # once, the server already spawned, no URI yet
        run_id = tracking.start_or_resume_run("during", "d-1")
        assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    assert seen == [(None, True)]


def test_while_starting_error_stops_the_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = str(tmp_path / "mlflow" / "mlflow.db")

    def fail() -> None:
        # Spawned: the child shows the store in its command line once it has exec'd, which may
        # be a moment after Popen returns (this failed once in a full run when checked at once).
        assert _wait_until(lambda: bool(_processes_naming(db))), "the server process never appeared"
        raise RuntimeError("ray could not start")

    with pytest.raises(RuntimeError, match="ray could not start"):
        with tracking_server(tmp_path, while_starting=fail):
            pytest.fail("the block must not run")
    assert _wait_until(lambda: not _processes_naming(db)), "the server process outlived the error"
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_store_uri_for_ui(tmp_path):
    cmd = store_uri_for_ui(tmp_path)
    assert cmd.startswith("mlflow ui --backend-store-uri sqlite:////")
    assert str(tmp_path.resolve() / "mlflow" / "mlflow.db") in cmd


def test_server_stops_cleanly_even_on_exception(tmp_path, monkeypatch):
    """Start, log, raise: the env var is restored, the port is closed, the process group is gone."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="boom"), tracking_server(tmp_path) as uri:
        assert os.environ["MLFLOW_TRACKING_URI"] == uri
        run_id = tracking.start_or_resume_run("stop", "s-1")
        tracking.log_metrics(run_id, {"x": 1.0}, step=3)
        assert tracking.last_logged_step(run_id, "x") == 3
        assert "--workers 1" in (tmp_path / "mlflow" / "server.log").read_text()
        pgids = {os.getpgid(int(p)) for p in _pids_listening(uri)}
        assert pgids and os.getpgrp() not in pgids  # the server runs in its own group
        raise RuntimeError("boom")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not _port_open(uri)
    for pgid in pgids:
        assert not _group_alive(pgid)


def test_server_timeout_error_names_log(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingServerError, match="server.log") as err:
        with tracking_server(tmp_path, timeout_s=0.01):
            pass
    assert "did not answer" in str(err.value)
    assert "=== tpr: starting" in str(err.value)  # the log tail is in the message
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
def test_restart_on_same_store_resumes_run(tmp_path, monkeypatch):
    """A later command on the same run directory finds the same run and its metrics."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking_server(tmp_path):
        run_id = tracking.start_or_resume_run("restart", "r-1")
        tracking.log_metrics(run_id, {"x": 1.0}, step=3)
        tracking.set_terminated(run_id, "KILLED")
    with tracking_server(tmp_path):
        assert tracking.start_or_resume_run("restart", "r-1") == run_id
        assert tracking.last_logged_step(run_id, "x") == 3


def _pids_listening(uri: str) -> list[str]:
    """Pids whose open sockets listen on the server's port (read from /proc, Linux)."""
    port = int(uri.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(inode)
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.append(pid_dir.name)
                    break
        except OSError:
            continue
    assert pids, f"no process listens on {uri}"
    return pids


def test_server_ends_when_its_driver_is_killed(tmp_path):
    """A driver killed with SIGKILL (no finally runs) leaves no MLflow server behind."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from pipelines.tracking_server import tracking_server\n"
        "with tracking_server(sys.argv[1]) as uri:\n"
        "    print(uri, flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    driver = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=Path(__file__).resolve().parents[2])
    uri = driver.stdout.readline().strip()
    assert uri.startswith("http://127.0.0.1:") and _healthy(uri)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _healthy(uri):
        time.sleep(0.5)
    assert not _healthy(uri), "the MLflow server outlived its driver"


def test_experiments_are_model_development_and_default_stores_behind_the_proxy(server):
    """tpr's experiments carry MLflow 3's kind tag (also one made before, without it); the store's
    Default experiment keeps its artifacts behind the server, not in the template's cache folder."""
    client = mlflow.MlflowClient()
    exp_id = tracking.get_or_create_experiment("kind")
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    bare = client.create_experiment("kind-older")
    assert tracking.get_or_create_experiment("kind-older") == bare
    assert client.get_experiment(bare).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment("0").artifact_location == "mlflow-artifacts:/0"


def test_ended_run_keeps_its_reason_and_end_time(server):
    run_id = tracking.start_or_resume_run("ended", "e-1", tags=tracking.context_tags("f" * 40))
    tracking.describe(run_id, "a training")
    assert tracking.end_open_run("ended", "e-1", "KILLED", "Stopped by the scheduler.") == run_id
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time >= run.info.start_time
    assert run.data.tags[tracking.DESCRIPTION_TAG] == "a training\n\nStopped by the scheduler."
    # set by MLflow's own context providers, the commit given when they find none
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.git.commit"]
    # an ended run is left as it is
    assert tracking.end_open_run("ended", "e-1", "FAILED", "late") == run_id
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    assert tracking.end_open_run("ended", "no-such-key", "FAILED") is None
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracking.set_terminated(run_id, "STOPPED")


def test_ui_url_opens_the_model_training_view():
    base = "http://127.0.0.1:5000/"
    assert tracking.ui_url(base, "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.ui_url(base, "3", "ab") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/ab?workflowType=machine_learning"
    )
    assert tracking.ui_url(base, model_name="tpr retrieval") == (
        "http://127.0.0.1:5000/#/models/tpr%20retrieval?workflowType=machine_learning"
    )
