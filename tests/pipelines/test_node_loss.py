"""A lost node on a real two-node Ray cluster on loopback (#20): ``bench/node_loss.py`` runs a
2-trial sweep and a 2-worker ``tpr train`` submitted as a Ray job through ``cluster/submit.sh``,
each losing the second node (every process of it, SIGKILL) after its first registered
checkpoint; this test checks the figures it prints.

It also stands for two earlier tests: a worker killed on a one-node cluster (the lost node
takes the worker with it, and the run must come back from its checkpoint on another node),
and a tiny training submitted once through ``cluster/submit.sh`` (the job SUCCEEDED, its
MLflow run FINISHED, the same submit again starts no second job)."""

import json
import os
import subprocess
import sys

import pytest

from tests.pipelines.conftest import REPO

EPOCHS, STEPS = 3, 10


def _check_lost_run(f: dict) -> None:
    """The lost run came back from a checkpoint on the head and finished, each step logged once."""
    assert f["killed"] and f["killer_error"] is None, f
    assert f["resumed_from_epoch"] is not None and 1 <= f["resumed_from_epoch"] < EPOCHS, f
    assert f["last_step_before_kill"] < EPOCHS * STEPS, f  # the kill came before the run's end
    assert f["finished_on_head"] and f["status"] == "FINISHED", f
    assert f["kill_to_first_new_step_s"] is not None and f["kill_to_next_report_s"] is not None, f
    for name, s in f["steps"].items():
        assert (s["first"], s["last"], s["count"]) == (1, EPOCHS * STEPS, EPOCHS * STEPS), (name, s)
        assert s["duplicated"] == [] and s["missing"] == [], (name, s)


@pytest.mark.slow
def test_a_sweep_and_a_training_survive_the_loss_of_a_node(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS",
                                                                                              "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    out = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, str(REPO / "bench/node_loss.py"), "--epochs", str(EPOCHS), "--steps",
                        str(STEPS), "--work", str(tmp_path / "w"), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    f = json.loads(out.read_text())
    print(json.dumps(f, indent=1))

    sweep = f["sweep"]
    assert sweep["statuses"] == ["DONE", "DONE"], sweep
    assert sweep["child_runs"] == 2, sweep  # one MLflow child run per trial, the lost one included
    _check_lost_run(sweep)

    train = f["train"]
    assert train["exit"] == 0 and train["runs"] == 1, train
    assert train["submission_id"].startswith("tpr-train-") and train["job_status"] == "SUCCEEDED", train
    assert train["again"] == {"exit": 0, "same_id": True, "not_submitted_again": True}, train
    assert train["jobs_with_that_id"] == 1, train
    _check_lost_run(train)
    # each validation once, and the best epoch's once more (linked to the logged model)
    best = train["best_val_step"]["nodeloss-train"]
    assert best in [STEPS * e for e in range(1, EPOCHS + 1)], train
    assert train["val_steps"]["nodeloss-train"] == sorted([STEPS * e for e in range(1, EPOCHS + 1)] + [best]), train
    # the last epoch's checkpoint carries the final report (test metrics), as without a loss
    assert train["latest_checkpoint"] == f"epoch-{EPOCHS:04d}" and train["latest_has_test"], train
