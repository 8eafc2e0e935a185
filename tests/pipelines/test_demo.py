"""The README's first command, end to end (quick size, same code path): `tpr demo --quick`;
and the demo's closing table, whose rows must have trained under one budget."""

import dataclasses
import io
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from pipelines.demo_report import Budget, Row, UnequalBudgets, build_table, check_budgets, verdict
from tests.pipelines.conftest import REPO

# Lines that tell a demo user nothing (each appeared in the demo's output before #19).
NOISE = {
    "MLflow 'View run' link": re.compile(r"View run \S+ at: http"),
    "Tune's max_concurrent_trials warning": re.compile(r"max_concurrent_trials"),
    "raylet worker start-up warning": re.compile(r"\(raylet\).*warn", re.IGNORECASE),
    "per-rank 'Reporting training result'": re.compile(r"Reporting training result"),
    "download progress bar": re.compile(r"Downloading artifacts:\s+\d+%"),
}
BUDGET_PARAMS = ("train.epochs", "train.max_steps_per_epoch", "data.batch_size", "distributed.num_workers",
                 "distributed.grad_accum")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo, its captured output and folder, shared by the module's slow tests."""
    tmp = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "160"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "demo", "--quick",
           "--runs-dir", str(tmp / "runs"), "--data-dir", str(tmp / "data")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return r, tmp


@pytest.mark.slow
def test_demo_runs_end_to_end(demo_run):
    r, tmp = demo_run
    for needle in (
        "baseline",
        "trial 1",
        "trial 2",
        "champion v1",
        "val R1",
        "test R1",
        "champion: models:/tpr-demo@champion",
        "mlflow ui --backend-store-uri sqlite:///",
        "query 1",
        "query 2",
    ):
        assert needle in r.stdout, (needle, r.stdout[-4000:])
    assert re.search(r"The sweep's best \(trial \d\) (beat|did not beat) the baseline on val R1", r.stdout)
    pngs = sorted((tmp / "runs" / "demo").rglob("query-*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    assert (tmp / "data" / "raw" / "reid_raw.json").is_file()


@pytest.mark.slow
def test_demo_table_compares_equal_budgets(demo_run):
    """Every training run in the demo's MLflow store (baseline and trials) logged the same
    budget, the table's title states it, and the table has a row for each of them."""
    from mlflow import MlflowClient

    r, tmp = demo_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    trained = [run for run in runs if "train.epochs" in run.data.params]
    assert len(trained) == 3  # the baseline and the quick demo's 2 trials
    budgets = {tuple(run.data.params[k] for k in BUDGET_PARAMS) for run in trained}
    assert budgets == {("4", "6", "64", "2", "1")}, budgets
    assert "every run: 4 epochs x 6 steps x batch 64 on 2 workers" in r.stdout
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "sdm"])
    labels = [line.split()[0] for line in lines[head + 2: head + 6]]
    assert labels == ["baseline", "trial", "trial", "champion"], lines[head: head + 6]
    assert max(len(line.rstrip()) for line in lines[head - 2: head + 6]) <= 80


@pytest.mark.slow
def test_demo_output_holds_no_noise(demo_run):
    r, _ = demo_run
    out = r.stdout + r.stderr
    found = {name: m.group(0) for name, pat in NOISE.items() if (m := pat.search(out))}
    assert not found, found


# -- the table and its budget check, on rows as read_row builds them (no run needed) --------

SEARCHED = ["loss.weights.sdm", "loss.weights.id", "loss.weights.mlm", "loss.mlm_mask_ratio"]
SIX = Budget(epochs=6, steps_per_epoch=26, batch=64, workers=2, grad_accum=1)


def _row(label, budget=SIX, epochs_done=6, status="done", val=18.6, test=None, w=(1.0, 1.0, 1.0, 0.15)):
    return Row(label=label, run_id=f"id-{label}", budget=budget, epochs_done=epochs_done, status=status,
               val_r1=val, test=test if test is not None else ({"R1": 25.3, "mAP": 30.1} if status == "done" else {}),
               searched=dict(zip(SEARCHED, w, strict=True)))


def _render(table) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_table_shows_every_row_within_80_columns_with_stopped_epochs():
    rows = [
        _row("baseline"),
        _row("trial 1", val=19.2, test={"R1": 24.1, "mAP": 29.0}, w=(1.42, 0.71, 1.1, 0.18)),
        _row("trial 2", epochs_done=2, status="stopped", val=9.5, w=(0.52, 1.93, 0.6, 0.27)),
        _row("champion v2 = trial 1", val=19.2, test={"R1": 24.1, "mAP": 29.0}, w=(1.42, 0.71, 1.1, 0.18)),
    ]
    text = _render(build_table(rows, SEARCHED))
    lines = text.rstrip("\n").splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, text
    assert "every run: 6 epochs x 26 steps x batch 64 on 2 workers" in text
    row = {line.split()[0] + line.split()[1]: line.split() for line in lines if line.strip().startswith(("trial", "base"))}
    assert row["trial2"][2:10] == ["0.52", "1.93", "0.60", "0.27", "2/6", "stopped", "9.50", "-"], text
    assert row["trial1"][2:9] == ["1.42", "0.71", "1.10", "0.18", "6/6", "19.20", "24.10"], text
    assert any(line.split()[:2] == ["champion", "v2"] for line in lines), text
    # A longer label (a champion from an earlier demo) wraps on an 80-column terminal; no number is cut.
    rows[-1] = dataclasses.replace(rows[-1], label="champion v2 = an earlier demo")
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(build_table(rows, SEARCHED))
    narrow = console.export_text()
    assert "…" not in narrow and max(len(line.rstrip()) for line in narrow.splitlines()) <= 80, narrow
    assert narrow.count("1.42") == 2 and narrow.count("0.27") == 1, narrow


def test_table_refuses_rows_of_unequal_budgets():
    half = SIX._replace(batch=32, workers=1)
    with pytest.raises(UnequalBudgets) as e:
        build_table([_row("baseline"), _row("trial 1"), _row("trial 2", budget=half)], SEARCHED)
    assert "trial 2 (run id-trial 2): 6 epochs x 26 steps x batch 32 on 1 workers" in str(e.value)
    assert "trial 1" not in str(e.value)
    fewer_steps = SIX._replace(steps_per_epoch=25)
    with pytest.raises(UnequalBudgets, match="champion"):
        check_budgets([_row("baseline"), _row("champion v1 = an earlier demo", budget=fewer_steps)])
    assert check_budgets([_row("baseline"), _row("trial 1")]) == SIX


def test_verdict_says_whether_the_sweep_beat_the_baseline():
    won = verdict(18.6, 19.2, "trial 1", True, "challenger val/R1 19.20 > champion v1 18.60 + margin 0",
                  base_test=25.3, best_test=24.1)
    assert won.startswith("The sweep's best (trial 1) beat the baseline on val R1 by 0.60 (19.20 vs 18.60)")
    assert "the gate promoted it" in won and "On test R1 it is lower: 24.10 vs the baseline's 25.30." in won
    lost = verdict(18.6, 18.6, "trial 3", False, "challenger val/R1 18.60 <= champion v1 18.60 + margin 0",
                   base_test=25.3, best_test=26.0)
    assert "did not beat the baseline on val R1 at this budget (18.60 vs 18.60)" in lost
    assert "the gate kept the champion" in lost and "higher: 26.00" in lost
