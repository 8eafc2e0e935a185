"""A lost worker node mid-sweep on a real two-node Ray cluster on loopback (#20).

A head (1 CPU) and a second node (1 CPU, its own temp dir and process group) share one storage
path; a 2-trial ``tpr sweep`` (1 worker per trial, tiny preset) puts one trial's worker on each
node (trial drivers stay on the head). Once both trials have checkpointed, the second node's
whole process group is SIGKILLed. Prints, as JSON: seconds from the kill to the lost trial's
next report (MLflow metric timestamps), the trials' statuses, and per child run whether any
metric step is duplicated or missing. ``--out`` also writes that JSON to a file.

    PYTHONPATH=$PWD python bench/node_loss.py [--epochs 3] [--steps 2] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data(root: Path) -> dict[str, str]:
    from tpr_core.data.prepare import prepare
    from tpr_core.data.synth import ensure_synthetic

    raw = ensure_synthetic(root / "raw", identities=300, images_per_identity=4, seed=0, size=(96, 32))
    prepare("cuhk-pedes", raw, root / "parquet")
    return {"raw": str(raw), "root": str(root / "parquet")}


def _checkpointed_runs(runs_dir: Path) -> set[Path]:
    """The runs (one per trial) that have written a checkpoint (``runs/ray/<run>/epoch-NNNN``)."""
    return {p.parent for p in (runs_dir / "ray").glob("*/epoch-*") if p.is_dir()}


def step_report(client, run_id: str) -> dict:
    """Per metric key of a run: duplicated steps, and for the most-logged key, missing ones."""
    run = client.get_run(run_id)
    dup, hist = {}, {}
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        hist[key] = steps
        if len(steps) != len(set(steps)):
            dup[key] = sorted(s for s in set(steps) if steps.count(s) > 1)
    main = max(hist, key=lambda k: len(hist[k])) if hist else None
    missing = []
    if main:
        s = sorted(set(hist[main]))
        missing = sorted(set(range(s[0], s[-1] + 1)) - set(s))
    return {"duplicated": dup, "main_key": main, "missing": missing}


def sweep_node_loss(work: Path, epochs: int = 3, steps: int = 2) -> dict:
    from mlflow import MlflowClient

    from tests.pipelines.local_cluster import LocalCluster

    work.mkdir(parents=True, exist_ok=True)
    data = _data(work / "synth")
    runs = work / "runs"
    with LocalCluster(work / "nodes", head_cpus=1, second_cpus=1) as cluster:
        os.environ.update(cluster.env())  # the driver connects to the cluster with its token
        from pipelines.sweep import sweep
        from pipelines.tracking_server import tracking_server
        from tpr_core.experiment import load_config

        ov = [f"data.root={data['root']}", f"data.raw_root={data['raw']}", "data.synthetic.size=[96, 32]",
              f"train.epochs={epochs}", "train.eval_every=1", "train.checkpoint_every=1",
              f"train.max_steps_per_epoch={steps}", "distributed.num_workers=1", "data.batch_size=16",
              "train.log_every=1", "distributed.max_failures=3"]
        cfg = load_config(REPO / "pipelines/configs/fmfa_synthetic_tiny.yaml", ov)
        killed: dict[str, float] = {}

        def killer() -> None:
            while not killed.get("stop"):
                if len(_checkpointed_runs(runs)) >= 2:  # both trials (one per node) have a checkpoint
                    killed["t"] = cluster.kill_second()
                    return
                time.sleep(0.2)

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        t0 = time.time()
        try:
            out = sweep(cfg, REPO / "tune_spaces/fmfa_demo.yaml", runs_dir=runs, samples=2,
                        max_concurrent=2, name="nodeloss")
        finally:
            killed["stop"] = 1.0
            import ray

            ray.shutdown()  # before the nodes go: a connected driver dies with its GCS
        wall = time.time() - t0
    figures: dict = {"sweep_wall_s": round(wall, 1), "killed": "t" in killed,
                     "statuses": [r["status"] for r in out["trials"]]}
    with tracking_server(runs) as uri:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment) if hasattr(cfg, "tracking") else None
        exps = [exp.experiment_id] if exp else [e.experiment_id for e in client.search_experiments()]
        all_runs = client.search_runs(exps)
        children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId")]
        figures["child_runs"] = len(children)
        figures["steps"] = {r.info.run_name: step_report(client, r.info.run_id) for r in children}
        if "t" in killed:
            t_kill = killed["t"] * 1000
            gaps = {}
            for r in children:  # the first new train step after the kill, per trial
                hist = client.get_metric_history(r.info.run_id, "train/loss")
                # the report of the checkpoint that triggered the kill may land just after it:
                # the next report is the one after the longest pause that follows the kill
                ts = sorted(m.timestamp for m in hist)
                after = [(b - a, b) for a, b in zip(ts, ts[1:]) if b > t_kill]
                gaps[r.info.run_name] = round((max(after)[1] - t_kill) / 1000, 1) if after else None
            # the lost trial: the one whose next step came last (a trial done before the kill has none)
            live = {k: v for k, v in gaps.items() if v is not None}
            lost = max(live, key=live.get) if live else None
            figures["lost_trial"] = lost
            figures["kill_to_next_report_s"] = live.get(lost)
            figures["next_step_after_kill_s"] = gaps
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = a.work or Path(tempfile.mkdtemp(prefix="nodeloss-"))
    figures = sweep_node_loss(work, a.epochs, a.steps)
    text = json.dumps(figures, indent=1, default=str)
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
