"""The driver->worker contract: one typed WorkerJob, built by prepare_run only; a sweep trial's
job differs from it only in its MLflow fields; it travels to the workers intact."""

import dataclasses
import pickle
import re
from pathlib import Path

import pytest

from tests.pipelines.conftest import REPO, tiny_overrides
from tpr_core.experiment import load_config


def test_prepare_run_builds_the_job_and_nothing_else_does(synth_data, tmp_path):
    from pipelines.job import WorkerJob
    from pipelines.train import prepare_run

    cfg = load_config(REPO / "pipelines/configs/irra_synthetic_tiny.yaml", tiny_overrides(synth_data))
    paths, job = prepare_run(cfg, tmp_path, "job")
    assert isinstance(job, WorkerJob) and job.cfg.data.root == cfg.data.root
    assert job.run_name == "job" and job.model_dir == paths.model_dir
    assert job.result_path == f"{paths.run_dir}/result.json"
    assert job.probe_path == f"{paths.run_dir}/probe.safetensors"
    assert (Path(job.tokenizer_dir) / "tpr_tokenizer.json").is_file()
    assert job.manifest_hash and job.git_commit
    assert (job.tracking_uri, job.parent_run_id, dict(job.extra_tags)) == (None, None, {})
    # Pickled into Ray's train_loop_config and back, as a worker receives it.
    back = pickle.loads(pickle.dumps(job.loop_config()))
    assert WorkerJob.of(back) == job
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.run_name = "other"

    builders = [
        str(p.relative_to(REPO))
        for p in (REPO / "pipelines").rglob("*.py")
        if re.search(r"\bWorkerJob\(", p.read_text())
    ]
    assert builders == ["pipelines/train.py"], builders


def test_a_sweep_trial_job_differs_only_in_its_mlflow_fields():
    from pipelines.job import WorkerJob
    from pipelines.sweep import trial_job

    cfg = load_config(REPO / "pipelines/configs/irra_synthetic_tiny.yaml")
    job = WorkerJob(
        cfg=cfg, run_name="s-t1", tokenizer_dir="/t", model_dir="/m", result_path="/r.json",
        probe_path="/p.safetensors", manifest_hash="h", git_commit="c",
    )
    params = {"loss.weights.id": 0.5, "optim.lr": 1e-3}
    trial = trial_job(job, "s", "parent-id", "http://127.0.0.1:5000", params)
    changed = {f.name for f in dataclasses.fields(job) if getattr(job, f.name) != getattr(trial, f.name)}
    assert changed == {"tracking_uri", "parent_run_id", "extra_tags"}
    assert trial.parent_run_id == "parent-id" and trial.tracking_uri == "http://127.0.0.1:5000"
    assert dict(trial.extra_tags) == {
        "tpr.sweep": "s", "tpr.trial_params": '{"loss.weights.id": 0.5, "optim.lr": 0.001}'
    }
