"""A lost tracking server (#20): the MLflow server of a running tpr train goes away and returns.

The server goes away for ``--outage`` seconds and comes back on the same port and store.

An ``mlflow server`` of this script's own (SQLite store, its own session) is the run's
``MLFLOW_TRACKING_URI``, as a team's server would be; ``tpr train`` (the CLI, a local Ray, IRRA
tiny, 1 worker, 4 epochs of 10 steps) logs to it. Once the run has logged its first validation
the server's whole session is SIGKILLed; after ``--outage`` seconds a new server starts on the
same port and store. Printed as JSON: the command's exit status, the run's status, each
``train/loss`` step's count (duplicated, missing), the longest pause between two logged steps,
and the seconds from the server's return to the next logged step.

``--retries N`` sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (and a backoff factor of 1) for the
command, to see an outage outlast MLflow's retries without waiting for the default window
(7 retries, backoff factor 2: about 4 minutes).

    PYTHONPATH=$PWD python bench/tracking_loss.py [--outage 30] [--retries N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.node_loss import CONFIG, _data, _overrides, _steps  # noqa: E402


def _server(store: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    from pipelines.tracking_server import _healthy

    deadline = time.time() + 120
    while not _healthy(f"http://127.0.0.1:{port}"):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: see {log}")
        time.sleep(0.5)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    from tests.pipelines.local_cluster import _kill_session

    _kill_session(proc.pid)
    proc.wait(timeout=30)


def tracking_loss(work: Path, outage_s: float, retries: int | None, epochs: int = 4, steps: int = 10) -> dict:
    from mlflow import MlflowClient

    from pipelines.tracking_server import _free_port, _sqlite_uri
    from tpr_core.experiment import load_config

    work.mkdir(parents=True, exist_ok=True)
    data = _data(work / "synth")
    store = work / "store"
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(store, port, work / "server.log")
    ov = _overrides(data, epochs, steps, workers=1)
    experiment = load_config(CONFIG, ov).tracking.experiment
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",) and not k.startswith("RAY_AUTH")}
    env["MLFLOW_TRACKING_URI"] = uri
    if retries is not None:
        env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    log = (work / "train.log").open("w")
    t0 = time.time()
    train = subprocess.Popen([str(Path(sys.executable).with_name("tpr")), "train", str(CONFIG), *ov,
                              "--runs-dir", str(work / "runs"), "--name", "tracking-loss"],
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    reader = MlflowClient(tracking_uri=_sqlite_uri(store / "mlflow.db"))
    figures: dict = {"outage_s": outage_s, "retries": retries}
    try:
        run_id = None
        while train.poll() is None:  # the first validation logged
            exp = reader.get_experiment_by_name(experiment)
            runs = reader.search_runs([exp.experiment_id]) if exp else []
            if runs and reader.get_metric_history(runs[0].info.run_id, "val/R1"):
                run_id = runs[0].info.run_id
                break
            time.sleep(0.2)
        if run_id is None:
            raise RuntimeError(f"tpr train ended before its first validation: see {work / 'train.log'}")
        t_kill = time.time()
        _kill(server)
        figures["killed_after_s"] = round(t_kill - t0, 1)
        while train.poll() is None and time.time() < t_kill + outage_s:
            time.sleep(0.2)
        t_back = time.time()
        server = _server(store, port, work / "server.log")
        figures["server_back_after_s"] = round(time.time() - t_kill, 1)
        train.wait(timeout=1800)
    finally:
        if train.poll() is None:
            _kill(train)
        _kill(server)
        log.close()
    figures["exit"] = train.returncode
    figures["wall_s"] = round(time.time() - t0, 1)
    run = reader.get_run(run_id)
    figures["run_status"] = run.info.status
    figures["steps"] = _steps(reader, run_id)
    ts = sorted(m.timestamp for m in reader.get_metric_history(run_id, "train/loss"))
    figures["longest_pause_s"] = round(max(b - a for a, b in zip(ts, ts[1:], strict=False)) / 1000, 1) if len(ts) > 1 else None
    after = [t for t in ts if t >= t_back * 1000]
    figures["back_to_next_step_s"] = round((after[0] - t_back * 1000) / 1000, 1) if after else None
    figures["resumed_from_epoch"] = run.data.tags.get("tpr.resumed_from_epoch")
    figures["log_tail"] = (work / "train.log").read_text(errors="replace")[-1500:]
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outage", type=float, default=30, help="seconds the server stays away")
    ap.add_argument("--retries", type=int, help="MLFLOW_HTTP_REQUEST_MAX_RETRIES for the command")
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    a = ap.parse_args(argv)
    for k, v in (("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"),
                 ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(k, v)
    figures = tracking_loss(a.work or Path(tempfile.mkdtemp(prefix="trackingloss-")), a.outage, a.retries)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
