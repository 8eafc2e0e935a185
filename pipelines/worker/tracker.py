"""The worker's MLflow run: logged from rank 0 only, resumed (not duplicated) after a restart."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.job import WorkerJob
from tpr_core.config import derived_params, flatten

BEST_MODEL_NAME = "model"  # the logged model of a training's best checkpoint (its exported folder)


class Tracker:
    """MLflow from rank 0 only; other ranks (and runs without a tracking URI) hold a no-op.

    The run is keyed by the job's run name, so a restarted worker group continues it; steps
    logged before the restart are not logged again. The run gets a description, the prepared
    dataset as its input, MLflow's system metrics while it trains, and at the end the best
    checkpoint as a logged model with its val and test metrics.
    """

    def __init__(self, enabled: bool, job: WorkerJob, resumed_epoch: int = 0) -> None:
        # The URI travels in the job: a worker started by a Tune trial does not inherit the
        # environment of the process that started the tracking server.
        if job.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
        self.enabled = enabled and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.run_id: str | None = None
        self.skip_until: dict[str, int] = {}
        self.dataset: Any = None
        self._monitor: Any = None
        if self.enabled:
            self._start(job, resumed_epoch)

    def _start(self, job: WorkerJob, resumed_epoch: int) -> None:
        from pipelines import tracking  # mlflow is imported only where it is used
        from tpr_core.data.store import read_manifest

        self._tracking = tracking
        self._job = job
        cfg = job.cfg
        tags = {
            "method": cfg.method,
            "dataset_manifest_hash": job.manifest_hash,
            "git_commit": job.git_commit,
            "ray_run_name": job.run_name,
            "tpr.model_dir": job.model_dir,
            **_placement_tags(resumed_epoch),
            **job.extra_tags,
        }
        self.run_id = tracking.start_or_resume_run(
            cfg.tracking.experiment, run_key=job.run_name, run_name=job.run_name, tags=tags,
            parent_run_id=job.parent_run_id,
        )
        tracking.log_params_flat(self.run_id, {**flatten(cfg.model_dump(mode="json")), **derived_params(cfg)})
        manifest = read_manifest(cfg.data.root)
        self.dataset = tracking.prepared_dataset(cfg.data.root, manifest, cfg.data.format)
        tracking.log_dataset_input(self.run_id, self.dataset)
        self._intro = _describe_training(job, manifest)
        tracking.describe(self.run_id, self._intro)
        for kind, key in (("train", "train/loss"), ("val", "val/R1")):
            last = tracking.last_logged_step(self.run_id, key)
            if last is not None:
                self.skip_until[kind] = last
        self._start_system_metrics(cfg.tracking.system_metrics_interval_s)

    def _start_system_metrics(self, interval_s: float) -> None:
        """MLflow's own monitor (``system/*`` metrics: CPU, memory, disk, network, GPU when there
        is one), continuing its steps after a restart."""
        if interval_s <= 0:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True)
        self._monitor.start()

    def log(self, metrics: dict[str, float], step: int, kind: str = "train") -> None:
        """Log ``metrics`` at ``step`` unless a run before a restart already logged that step."""
        if not self.enabled:
            return
        if step <= self.skip_until.get(kind, -1):
            return  # already logged before a restart: no duplicated steps
        self._tracking.log_metrics(self.run_id, metrics, step=step)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._tracking.log_artifact(self.run_id, path, artifact_path)

    def log_best_model(
        self, folder: str | Path, val: Mapping[str, float], val_step: int, test: Mapping[str, float], test_step: int,
    ) -> str | None:
        """Log the exported best checkpoint as the run's logged model, its val metrics (at the
        step they were measured) and test metrics linked to it and to the dataset; returns its id."""
        if not self.enabled:
            return None
        return self._tracking.log_folder_model(
            self.run_id, folder, BEST_MODEL_NAME, [(val, val_step), (test, test_step)], dataset=self.dataset,
            tags={**self._job.extra_tags, "tpr.method": self._job.cfg.method}, model_type=self._job.cfg.method,
        )

    def finish(self, status: str = "FINISHED", summary: str | None = None) -> None:
        """Stop the system metrics, add ``summary`` to the description, end the run."""
        if not self.enabled:
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if summary:
            self._tracking.describe(self.run_id, f"{self._intro}\n\n{summary}")
        self._tracking.set_terminated(self.run_id, status)


def _placement_tags(resumed_epoch: int) -> dict[str, str]:
    """Where this worker group runs, set again by a restarted one: rank 0's Ray node and host, and
    the checkpoint's epoch when the group resumed one (after a lost worker or node)."""
    import socket

    import ray

    tags = {"tpr.host": socket.gethostname()}
    if ray.is_initialized():
        tags["tpr.ray_node_id"] = ray.get_runtime_context().get_node_id()
    if resumed_epoch:
        tags["tpr.resumed_from_epoch"] = str(resumed_epoch)
    return tags


def _describe_training(job: WorkerJob, manifest: Mapping[str, Any]) -> str:
    """The run's description: what trained on what, and how."""
    cfg, d = job.cfg, job.cfg.distributed
    train = manifest.get("counts", {}).get("train", {})
    data = f"{cfg.data.format} data at {cfg.data.root}"
    if train:
        data += f" ({train.get('identities')} identities, {train.get('images')} images, {train.get('captions')} captions)"
    sweep = f" Trial of sweep {job.extra_tags['tpr.sweep']}." if "tpr.sweep" in job.extra_tags else ""
    return (
        f"{cfg.method.upper()} trained on {data}: {cfg.train.epochs} epochs, global batch {cfg.data.batch_size}, "
        f"{d.num_workers} Ray Train worker(s) with DeepSpeed ZeRO-{d.zero_stage}"
        f"{' on GPU' if d.use_gpu else ' on CPU'}; the best checkpoint by val/R1 is kept.{sweep}"
    )
