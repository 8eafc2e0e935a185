"""A lost worker node on a real two-node Ray cluster on loopback (#20): bench/node_loss.py's
2-trial sweep, whose second node is SIGKILLed (its whole process group) after a checkpoint."""

import json
import os
import subprocess
import sys

from tests.pipelines.conftest import REPO


def test_a_sweep_survives_its_second_node(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)}
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    out = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, str(REPO / "bench/node_loss.py"), "--epochs", "2", "--work", str(tmp_path / "w"),
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    f = json.loads(out.read_text())
    assert f["killed"], f
    assert f["statuses"] == ["DONE", "DONE"], f
    assert f["child_runs"] == 2, f  # one MLflow child run per trial, the lost one included
    for name, s in f["steps"].items():
        assert "train/loss" not in s["duplicated"], (name, s)
        assert s["missing"] == [], (name, s)
