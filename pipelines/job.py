"""What the driver hands every Ray Train worker: one :class:`WorkerJob`.

``pipelines.train.prepare_run`` builds it (the only place that does); ``tpr train`` and each
sweep trial derive theirs from it with ``dataclasses.replace``. It travels to the workers
inside Ray's ``train_loop_config`` (:meth:`WorkerJob.loop_config`; it pickles: plain values
and a pydantic config), which Ray wants to be a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tpr_core.config import ExperimentConfig

_LOOP_CONFIG_KEY = "job"


@dataclass(frozen=True)
class WorkerJob:
    """One training, as every worker of it sees it.

    Attributes:
        cfg: the resolved experiment config (paths absolute, checked by the preflight).
        run_name: the Ray Train run name; also the MLflow run's name and key, so a restarted
            worker group or a resumed command finds its run again.
        tokenizer_dir: the run's tokenizer folder (local path or storage URI).
        model_dir: where the best model is exported (local path or storage URI).
        result_path: ``result.json`` written by rank 0 at the end (final metrics).
        probe_path: ``probe.safetensors`` written by rank 0 at the end: the engine's embeddings of
            a fixed probe, to compare with the exported model's.
        manifest_hash: content hash of the prepared dataset (MLflow tag, export info).
        git_commit: the code's commit (MLflow tag, export info).
        tracking_uri: MLflow tracking URI the workers log to; None: the worker's environment
            decides (no ``MLFLOW_TRACKING_URI`` there: no tracking). Carried here because a
            worker started by a Tune trial does not inherit the environment of the process that
            started the tracking server.
        parent_run_id: MLflow parent run (a sweep's), or None.
        extra_tags: MLflow tags added to the worker's run (a sweep trial's name and params).
    """

    cfg: ExperimentConfig
    run_name: str
    tokenizer_dir: str
    model_dir: str
    result_path: str
    probe_path: str
    manifest_hash: str
    git_commit: str
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    extra_tags: Mapping[str, str] = field(default_factory=dict)

    def loop_config(self) -> dict[str, WorkerJob]:
        """Ray's ``train_loop_config`` carrying this job."""
        return {_LOOP_CONFIG_KEY: self}

    @staticmethod
    def of(loop_config: dict[str, Any]) -> WorkerJob:
        """The job inside a worker's ``train_loop_config`` (see :meth:`loop_config`)."""
        return loop_config[_LOOP_CONFIG_KEY]
