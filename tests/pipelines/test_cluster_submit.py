"""A real local Ray cluster: `ray start --head` on 127.0.0.1, a tiny training submitted through
cluster/submit.sh (`ray job submit --working-dir`), SUCCEEDED, its MLflow run exists, and a
second submit of the same command does not start a second job."""

import contextlib
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
    """`ray start --head --block` in its own process group, so that stopping it touches no
    other Ray instance on the machine (``ray stop`` would stop them all)."""
    import shutil
    import signal
    import tempfile
    import time
    import urllib.request

    port, dash = _free_port(), _free_port()
    raytmp = tempfile.mkdtemp(prefix="tpr-ray-", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           # no graceful drain on SIGTERM: with a finished job's workers still leased, the
           # head would wait out the whole 30 s default before stopping
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         "--disable-usage-stats", "--temp-dir", raytmp],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("the Ray head's job server did not come up: " + (tmp_path / "ray-head.log").read_text()[-3000:])
    # The job agent registers after the dashboard answers: wait until a trivial job runs.
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    while time.time() < deadline:
        try:
            probe = client.submit_job(entrypoint="echo ready")
            break
        except RuntimeError:
            time.sleep(2)
    else:
        pytest.fail("the Ray head's job agent did not take a job: " + (tmp_path / "ray-head.log").read_text()[-3000:])
    while time.time() < deadline and client.get_job_status(probe) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        time.sleep(1)
    try:
        yield address, env
    finally:
        proc.terminate()  # `ray start` stops its own processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        proc.wait()
        log.close()
        shutil.rmtree(raytmp, ignore_errors=True)


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
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(sub_id) == JobStatus.SUCCEEDED
    result = json.loads((runs / "ray" / "submitted" / "result.json").read_text())
    assert result["mlflow_run_id"]

    from mlflow import MlflowClient

    from pipelines.tracking_server import tracking_server

    with tracking_server(runs) as uri:
        run = MlflowClient(uri).get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED" and "test/R1" in run.data.metrics

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0].strip() == sub_id
    assert "not submitting again" in again.stderr
    jobs = JobSubmissionClient(address).list_jobs()
    assert [j.submission_id for j in jobs].count(sub_id) == 1
    assert len(jobs) == 2  # the readiness probe and the training
