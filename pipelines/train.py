"""``tpr train``: one training of one method on Ray Train workers with DeepSpeed."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.job import WorkerJob
from pipelines.setup import (
    RunPaths,
    absolutize,
    ensure_dataset,
    ensure_tokenizer,
    git_commit,
    init_ray,
    preflight,
    ray_configs,
    run_paths,
)
from pipelines.storage import exists, is_uri, upload_dir
from tpr_core.config import ExperimentConfig


def default_run_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run(cfg: ExperimentConfig, runs_dir: str | Path, name: str) -> tuple[RunPaths, WorkerJob]:
    """Everything checked and on disk before any worker starts; returns the run's paths and
    the workers' job (the one place a :class:`WorkerJob` is built; its ``cfg`` is ``cfg``
    resolved)."""
    cfg = absolutize(cfg)
    preflight(cfg)
    paths = run_paths(runs_dir, name)
    manifest = ensure_dataset(cfg)
    if is_uri(paths.storage):  # workers on other nodes read it from the runs dir's storage
        tok_dir = paths.tokenizer_dir
        if not exists(f"{tok_dir}/tpr_tokenizer.json"):  # kept on a resume
            with tempfile.TemporaryDirectory() as tmp:
                upload_dir(ensure_tokenizer(cfg, str(Path(tmp, "tokenizer"))), tok_dir)
    else:
        tok_dir = ensure_tokenizer(cfg, str(paths.runs_dir / "tokenizers" / name))
    job = WorkerJob(
        cfg=cfg,
        run_name=name,
        tokenizer_dir=tok_dir,
        model_dir=paths.model_dir,
        result_path=f"{paths.run_dir}/result.json",
        probe_path=f"{paths.run_dir}/probe.safetensors",
        manifest_hash=manifest.get("content_hash", ""),
        git_commit=git_commit(),
    )
    return paths, job


def fit(
    paths: RunPaths,
    job: WorkerJob,
    callbacks: list | None = None,
    train_fn: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Build the TorchTrainer (the same for train and sweep) and run it; returns Ray's Result.

    ``train_fn`` is what every worker runs with ``job.loop_config()``; default
    ``pipelines.worker.train_loop``. A training that fails raises (Ray Train 2's ``fit`` raises
    the error it would otherwise put in the Result); the caller ends the MLflow run with it.
    """
    from ray.train.torch import TorchTrainer

    from pipelines.worker import train_loop

    scaling, run = ray_configs(job.cfg, paths, callbacks)
    trainer = TorchTrainer(
        train_fn or train_loop, train_loop_config=job.loop_config(), scaling_config=scaling, run_config=run
    )
    return trainer.fit()


def end_failed_run(job: WorkerJob, error: BaseException) -> None:
    """Mark the training's MLflow run FAILED with the error in its description, if a worker
    opened it and could not end it (an exception, a killed process); never masks ``error``."""
    if not job.tracking_uri:
        return
    from pipelines import tracking

    try:
        tracking.end_open_run(job.cfg.tracking.experiment, job.run_name, "FAILED", tracking.failure_note(error))
    except Exception as e:  # the training's own error is the one to raise
        print(f"[tpr] warning: could not mark MLflow run {job.run_name!r} failed: {e}", flush=True)


def train(
    cfg: ExperimentConfig,
    runs_dir: str | Path = "runs",
    name: str | None = None,
    train_fn: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one training end to end; returns the final metrics (test/*, best/*, model_dir, run id).

    ``train_fn``: what every worker runs (see :func:`fit`).
    """
    from pipelines import tracking
    from pipelines.storage import read_text
    from pipelines.tracking_server import tracking_server

    name = name or default_run_name(cfg)
    paths, job = prepare_run(cfg, runs_dir, name)
    # Ray starts while the MLflow server boots; the workers get the URI from their job.
    with tracking_server(paths.runs_dir, while_starting=init_ray) as uri:
        # The workers run Ray's entry point: MLflow's source tags are this process's.
        job = replace(job, tracking_uri=uri, extra_tags={**tracking.context_tags(job.git_commit), **job.extra_tags})
        try:
            fit(paths, job, train_fn=train_fn)
        except Exception as e:
            end_failed_run(job, e)
            raise
    metrics = json.loads(read_text(job.result_path))
    metrics["run_name"] = name
    metrics["run_dir"] = paths.run_dir
    return metrics
