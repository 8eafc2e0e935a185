"""The README's first command, end to end (quick size, same code path): `tpr demo --quick`."""

import os
import subprocess
import sys

import pytest

from tests.pipelines.conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "160"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "demo",
        "--quick",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for needle in (
        "IRRA baseline",
        "FMFA sweep best",
        "R1",
        "mINP",
        "champion: models:/tpr-demo@champion",
        "mlflow ui --backend-store-uri sqlite:///",
        "query 1",
        "query 2",
    ):
        assert needle in r.stdout, (needle, r.stdout[-4000:])
    pngs = sorted((tmp_path / "runs" / "demo").rglob("query-*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    assert (tmp_path / "data" / "raw" / "reid_raw.json").is_file()
