"""A real local Ray cluster: `ray start --head` on 127.0.0.1, a tiny training submitted through
cluster/submit.sh (`ray job submit --working-dir`), SUCCEEDED, its MLflow run exists, and a
second submit of the same command does not start a second job."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    port, dash = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--disable-usage-stats",
            "--temp-dir",
            str(tmp_path / "raytmp"),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_tiny_training_once(ray_head, synth_data, tmp_path):
    address, env = ray_head
    runs = tmp_path / "runs"
    cmd = [
        "bash",
        "cluster/submit.sh",
        "--address",
        address,
        "--env",
        "DS_ACCELERATOR=cpu",
        "--",
        "tpr",
        "train",
        "pipelines/configs/irra_synthetic_tiny.yaml",
        *tiny_overrides(
            synth_data, train__epochs=1, train__max_steps_per_epoch=2, distributed__num_workers=1
        ),
        "--runs-dir",
        str(runs),
        "--name",
        "submitted",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    sub_id = r.stdout.splitlines()[0].strip()
    assert sub_id.startswith("tpr-train-")
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, sub_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "SUCCEEDED" in status.stdout + status.stderr
    result = json.loads((runs / "ray" / "submitted" / "result.json").read_text())
    assert result["mlflow_run_id"]

    from mlflow import MlflowClient

    from pipelines.tracking import tracking_server

    with tracking_server(runs) as uri:
        run = MlflowClient(uri).get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED" and "test/R1" in run.data.metrics

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0].strip() == sub_id
    assert "not submitting again" in again.stderr
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(address).list_jobs()
    assert [j.submission_id for j in jobs].count(sub_id) == 1
