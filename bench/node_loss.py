"""A lost node (#20): a sweep and a tpr train job each lose a node of a two-node Ray cluster.

On a real two-node Ray cluster on loopback, a sweep and a ``tpr train`` each lose the node that
runs part of their work, and finish.

The cluster (``tests/pipelines/local_cluster.py``): a head with 2 CPUs and a second node with
1 CPU, each its own ``ray start`` in its own process group, one storage path. While the work
is placed, one head CPU is held by an idle actor, so that the work has to use the second node;
the hold is let go at the kill, standing for the spare capacity a cluster has (or the node an
autoscaler brings), so the lost work continues on the head.

1. ``sweep``: a 2-trial sweep (IRRA tiny, 1 worker per trial): one trial trains on each node.
   Once the trial on the second node has its first checkpoint registered by Ray Train, the
   second node's whole process group is SIGKILLed.
2. ``train``: a replacement second node joins; ``tpr train`` with 2 workers, one on each node,
   submitted as a Ray job through ``cluster/submit.sh`` (token authentication, the repository
   uploaded as the job's working dir); the same kill after its first checkpoint; then the same
   submit again, which must report the finished job and start none.

Printed as JSON (``--out`` writes it to a file too), per scenario: seconds from the kill to the
lost run's first new train step and to its next report (the next epoch's validation), the
checkpoint epoch it resumed from and the node it finished on (its MLflow tags), each MLflow
run's duplicated or missing steps, and the trials' statuses.

    PYTHONPATH=$PWD python bench/node_loss.py [--epochs 3] [--steps 10] [--out figures.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "pipelines/configs/irra_synthetic_tiny.yaml"
SPACE = """\
metric: best_val/R1
mode: max
search: random
samples: 2
scheduler: {type: none}
params:
  loss.weights.sdm: {loguniform: [0.5, 2.0]}
"""


def _data(root: Path) -> dict[str, str]:
    from tpr_core.data.prepare import prepare
    from tpr_core.data.synth import ensure_synthetic

    raw = ensure_synthetic(root / "raw", identities=120, images_per_identity=4, seed=0, size=(96, 32))
    prepare("cuhk-pedes", raw, root / "parquet")
    return {"raw": str(raw), "root": str(root / "parquet")}


def _overrides(data: dict[str, str], epochs: int, steps: int, workers: int) -> list[str]:
    return [f"data.root={data['root']}", f"data.raw_root={data['raw']}", "data.synthetic.size=[96, 32]",
            f"train.epochs={epochs}", "train.eval_every=1", "train.checkpoint_every=1",
            f"train.max_steps_per_epoch={steps}", f"distributed.num_workers={workers}", "data.batch_size=16",
            "train.log_every=1", "distributed.max_failures=3", "tracking.system_metrics_interval_s=0"]


def _client(runs: Path):
    """A reader of the runs folder's MLflow store (SQLite, read while the server writes it)."""
    from mlflow import MlflowClient

    from pipelines.tracking_server import _db_path, _sqlite_uri

    return MlflowClient(tracking_uri=_sqlite_uri(_db_path(runs)))


def _registered(run_dir: Path, epoch: int) -> bool:
    """Whether Ray Train's controller has registered the run's checkpoint of ``epoch`` (its
    checkpoint manager's snapshot names it): a restart can then resume from it."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return f"epoch-{epoch:04d}" in snap.read_text()
    except OSError:
        return False


class Killer(threading.Thread):
    """Watches the MLflow store of ``runs``; when the watched run has its first checkpoint
    registered, SIGKILLs every process of the second node and calls ``after_kill`` (which lets
    the held head CPU go). The watched run: the one whose rank 0 trains on the second node
    (its ``tpr.ray_node_id`` tag), or with ``second_id`` None the experiment's only run."""

    def __init__(self, cluster: Any, runs: Path, experiment: str, second_id: str | None, after_kill) -> None:
        super().__init__(daemon=True)
        self.cluster, self.runs, self.experiment, self.second_id = cluster, runs, experiment, second_id
        self.after_kill = after_kill
        self.done = threading.Event()
        self.t_start = time.time()
        self.t_kill: float | None = None
        self.victim: dict | None = None  # run id and name, and what it had logged at the kill
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._watch()
        except Exception as e:  # reported in the figures, never a hang
            self.error = f"{type(e).__name__}: {e}"

    def figures(self) -> dict:
        """Seconds since the watch began, whether the node was killed, and the watch's error."""
        return {"wall_s": round(time.time() - self.t_start, 1), "killed": self.t_kill is not None,
                "killer_error": self.error}

    def _watch(self) -> None:
        client = None
        where = f"tags.`tpr.ray_node_id` = '{self.second_id}'" if self.second_id else ""
        while not self.done.is_set():
            time.sleep(0.1)
            if client is None:
                if not (self.runs / "mlflow" / "mlflow.db").exists():
                    continue
                client = _client(self.runs)
            try:
                exp = client.get_experiment_by_name(self.experiment)
                found = exp and client.search_runs([exp.experiment_id], filter_string=where)
            except Exception:  # the server may hold a write lock for a moment
                continue
            for r in found or []:
                name = r.data.tags["ray_run_name"]
                if _registered(self.runs / "ray" / name, 1):
                    self.t_kill = self.cluster.kill_second()
                    self.after_kill()
                    logged = client.get_metric_history(r.info.run_id, "train/loss")
                    self.victim = {"run_id": r.info.run_id, "name": name,
                                   "last_step_before_kill": max((m.step for m in logged), default=0)}
                    return


def _steps(client, run_id: str) -> dict:
    """Duplicated steps of ``train/loss``, and steps missing between its first and last."""
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    missing = sorted(set(range(min(steps), max(steps) + 1)) - set(steps)) if steps else []
    return {"count": len(steps), "first": min(steps, default=None), "last": max(steps, default=None),
            "duplicated": dup, "missing": missing}


def _best_val_step(client, run) -> int | None:
    """The step of the val/R1 linked to the run's logged model (its best checkpoint)."""
    for out in run.outputs.model_outputs if run.outputs else []:
        for m in client.get_logged_model(out.model_id).metrics or []:
            if m.key == "val/R1":
                return m.step
    return None


def _after_kill(client, killer: Killer, head_id: str, steps_per_epoch: int) -> dict:
    """The lost run after the kill: first new step and next report, in seconds from the kill;
    the epoch it resumed from and the node it finished on."""
    v = killer.victim
    assert v is not None and killer.t_kill is not None
    t_kill_ms = killer.t_kill * 1000
    train = client.get_metric_history(v["run_id"], "train/loss")
    new = [m for m in train if m.step > v["last_step_before_kill"]]
    first_val = (v["last_step_before_kill"] // steps_per_epoch + 1) * steps_per_epoch  # next epoch's last step
    val = [m for m in client.get_metric_history(v["run_id"], "val/R1") if m.step >= first_val]
    run = client.get_run(v["run_id"])
    tags = run.data.tags
    return {
        "lost_run": v["name"],
        "last_step_before_kill": v["last_step_before_kill"],
        "kill_to_first_new_step_s": round((min(m.timestamp for m in new) - t_kill_ms) / 1000, 1) if new else None,
        "kill_to_next_report_s": round((min(m.timestamp for m in val) - t_kill_ms) / 1000, 1) if val else None,
        "resumed_from_epoch": int(tags["tpr.resumed_from_epoch"]) if "tpr.resumed_from_epoch" in tags else None,
        "finished_on_head": tags.get("tpr.ray_node_id") == head_id,
        "status": run.info.status,
    }


class HeadHold:
    """An idle actor holding one head CPU while work is placed; :meth:`release` lets it go."""

    def __init__(self) -> None:
        import ray

        @ray.remote(num_cpus=1, resources={"node:__internal_head__": 0.001})
        class _Hold:
            def ready(self) -> bool:
                return True

        self._actor = _Hold.remote()
        ray.get(self._actor.ready.remote(), timeout=60)

    def release(self) -> None:
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None


@contextlib.contextmanager
def _second_node_lost(cluster: Any, runs: Path, experiment: str, second_id: str | None) -> Iterator[Killer]:
    """For the block: one head CPU held and a :class:`Killer` watching ``runs``; both stopped at
    its end. The killer's :meth:`~Killer.figures` say how it went."""
    hold = HeadHold()
    killer = Killer(cluster, runs, experiment, second_id, hold.release)
    killer.start()
    try:
        yield killer
    finally:
        killer.done.set()
        hold.release()


def sweep_scenario(cluster: Any, work: Path, data: dict, epochs: int, steps: int) -> dict:
    """A 2-trial sweep, one trial per node; the second node is lost after that trial's first
    checkpoint. Runs in this process (a driver connected to the cluster)."""
    from pipelines.setup import init_ray
    from pipelines.sweep import sweep
    from tpr_core.experiment import load_config

    runs = work / "sweep-runs"
    space = work / "space.yaml"
    space.write_text(SPACE)
    cfg = load_config(CONFIG, _overrides(data, epochs, steps, workers=1))
    init_ray()  # connected from here on: the cluster's questions are answered in this process
    nodes = cluster.node_ids()
    with _second_node_lost(cluster, runs, cfg.tracking.experiment, nodes["second"]) as killer:
        out = sweep(cfg, space, runs_dir=runs, samples=2, max_concurrent=2, name="nodeloss")
    figures = {**killer.figures(), "statuses": sorted(r["status"] for r in out["trials"])}
    client = _client(runs)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    figures["child_runs"] = len(children)
    figures["steps"] = {r.info.run_name: _steps(client, r.info.run_id) for r in children}
    if killer.victim:
        figures.update(_after_kill(client, killer, nodes["head"], steps))
    return figures


def train_scenario(cluster: Any, work: Path, data: dict, epochs: int, steps: int) -> dict:
    """``tpr train`` with 2 workers, one per node (a replacement second node first), submitted as
    a Ray job through ``cluster/submit.sh`` (its driver runs on the head, as on a real cluster);
    the second node is lost after the first checkpoint. Then the same submit again, which must
    find the finished job and not start a second one."""
    from ray.job_submission import JobSubmissionClient

    from tpr_core.experiment import load_config

    cluster.start_second()
    nodes = cluster.node_ids()
    runs = work / "train-runs"
    ov = _overrides(data, epochs, steps, workers=2)
    cfg = load_config(CONFIG, ov)
    cmd = ["bash", "cluster/submit.sh", "--address", cluster.dashboard_url, "--env", "DS_ACCELERATOR=cpu", "--",
           "tpr", "train", str(CONFIG.relative_to(REPO)), *ov, "--runs-dir", str(runs), "--name", "nodeloss-train"]
    env = cluster.env()
    # rank 0 may be on either node: the run is watched whichever it is
    with _second_node_lost(cluster, runs, cfg.tracking.experiment, None) as killer:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    figures = {**killer.figures(), "exit": r.returncode}
    if r.returncode != 0:
        figures["output_tail"] = (r.stdout + r.stderr)[-3000:]
        return figures
    sub_id = r.stdout.splitlines()[0].strip()
    jobs = JobSubmissionClient(cluster.dashboard_url)
    figures["submission_id"] = sub_id
    figures["job_status"] = str(jobs.get_job_status(sub_id))
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    figures["again"] = {"exit": again.returncode, "same_id": again.stdout.splitlines()[:1] == [sub_id],
                        "not_submitted_again": "not submitting again" in again.stderr}
    figures["jobs_with_that_id"] = [j.submission_id for j in jobs.list_jobs()].count(sub_id)
    client = _client(runs)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = client.search_runs([exp.experiment_id]) if exp else []
    figures["runs"] = len(found)
    figures["steps"] = {x.info.run_name: _steps(client, x.info.run_id) for x in found}
    figures["val_steps"] = {x.info.run_name: sorted(m.step for m in client.get_metric_history(x.info.run_id, "val/R1"))
                            for x in found}
    figures["best_val_step"] = {x.info.run_name: _best_val_step(client, x) for x in found}
    from ray.train import Result

    latest = Result.from_path(str(runs / "ray" / "nodeloss-train"))
    figures["latest_checkpoint"] = Path(latest.checkpoint.path).name
    figures["latest_has_test"] = "test/R1" in latest.metrics
    if killer.victim:
        figures.update(_after_kill(client, killer, nodes["head"], steps))
    return figures


def node_loss(work: Path, epochs: int = 3, steps: int = 10, fast_health_check: bool = True) -> dict:
    from tests.pipelines.local_cluster import LocalCluster

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _data(work / "synth")
    figures: dict = {"data_s": round(time.time() - t0, 1), "fast_health_check": fast_health_check}
    with LocalCluster(work / "nodes", head_cpus=2, second_cpus=1, fast_health_check=fast_health_check) as cluster:
        figures["cluster_start_s"] = round(time.time() - t0 - figures["data_s"], 1)
        # This process becomes a driver of the cluster, with its token (read when Ray is imported).
        os.environ.update(cluster.env())
        import ray

        try:
            figures["sweep"] = sweep_scenario(cluster, work, data, epochs, steps)
            figures["train"] = train_scenario(cluster, work, data, epochs, steps)
        finally:
            ray.shutdown()  # before the nodes go: a driver still connected dies with its GCS
    figures["total_s"] = round(time.time() - t0, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="train steps per epoch")
    ap.add_argument("--ray-health-check", action="store_true",
                    help="Ray's own node health check settings, not the shortened ones of the test")
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, help="also write the figures (JSON) here")
    a = ap.parse_args(argv)
    for k, v in (("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(k, v)
    work = a.work or Path(tempfile.mkdtemp(prefix="nodeloss-"))
    figures = node_loss(work, a.epochs, a.steps, fast_health_check=not a.ray_health_check)
    text = json.dumps(figures, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
