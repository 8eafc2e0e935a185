"""The worker's MLflow run: logged from rank 0 only, resumed (not duplicated) after a restart."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.job import WorkerJob
from tpr_core.config import derived_params, flatten


class Tracker:
    """MLflow from rank 0 only; other ranks (and runs without a tracking URI) hold a no-op.

    The run is keyed by the job's run name, so a restarted worker group continues it; steps
    logged before the restart are not logged again.
    """

    def __init__(self, enabled: bool, job: WorkerJob) -> None:
        # The URI travels in the job: a worker started by a Tune trial does not inherit the
        # environment of the process that started the tracking server.
        if job.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
        self.enabled = enabled and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.run_id: str | None = None
        self.skip_until: dict[str, int] = {}
        if self.enabled:
            self._start(job)

    def _start(self, job: WorkerJob) -> None:
        from pipelines import tracking  # mlflow is imported only where it is used

        self._tracking = tracking
        cfg = job.cfg
        tags = {
            "method": cfg.method,
            "dataset_manifest_hash": job.manifest_hash,
            "git_commit": job.git_commit,
            "ray_run_name": job.run_name,
            "tpr.model_dir": job.model_dir,
            **job.extra_tags,
        }
        self.run_id = tracking.start_or_resume_run(
            cfg.tracking.experiment, run_key=job.run_name, run_name=job.run_name, tags=tags,
            parent_run_id=job.parent_run_id,
        )
        tracking.log_params_flat(self.run_id, {**flatten(cfg.model_dump(mode="json")), **derived_params(cfg)})
        for kind, key in (("train", "train/loss"), ("val", "val/R1")):
            last = tracking.last_logged_step(self.run_id, key)
            if last is not None:
                self.skip_until[kind] = last

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

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._tracking.set_terminated(self.run_id, status)
