"""A sweep whose driver is killed mid-way and resumed with --resume (its own module: the driver
runs in a subprocess with its own local Ray instance)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.pipelines.conftest import REPO, every_epoch, tiny_overrides

SPACE = REPO / "tune_spaces" / "fmfa_demo.yaml"


@pytest.mark.slow
def test_killed_sweep_resumes_with_one_child_per_trial(synth_data, tmp_path):
    """The sweep driver is killed mid-way (SIGKILL), then `--resume` finishes it."""
    from mlflow import MlflowClient

    from pipelines.tracking_server import tracking_server

    over = tiny_overrides(synth_data, **every_epoch(3, 2, distributed__num_workers=1, data__batch_size=16))
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "sweep",
        str(REPO / "pipelines/configs/fmfa_synthetic_tiny.yaml"),
        *over,
        "--space",
        str(SPACE),
        "--samples",
        "2",
        "--name",
        "rs",
        "--runs-dir",
        str(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # stdout to a file: a pipe nobody reads would block the driver once it fills
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # kill once the first checkpoint of a trial exists
    deadline = time.time() + 600
    while time.time() < deadline and not list((tmp_path / "ray").glob("rs-t*/epoch-0001")):
        time.sleep(2)
    assert list((tmp_path / "ray").glob("rs-t*/epoch-0001")), "no trial checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The driver's own local Ray instance (raylet, GCS, workers) lived in its process group.
    r = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with tracking_server(tmp_path) as uri:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("tpr-synthetic")
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`tpr.run_key` = 'sweep:rs'")
        assert len(parents) == 1
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
        )
        keys = [c.data.tags["tpr.run_key"] for c in children]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 2, keys
    # A resume must repeat the sweep's base config: another override is refused, naming the key.
    r = subprocess.run(cmd + ["optim.lr=0.001", "--resume"], cwd=REPO, env={**env, "COLUMNS": "500"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "another base config" in r.stderr and "base.optim.lr" in r.stderr, r.stderr[-2000:]
