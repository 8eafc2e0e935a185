"""tpr sweep on CPU: real Ray Tune over real Ray Train + DeepSpeed trials, real MLflow."""

import json
from pathlib import Path

import pytest
import yaml

from tests.pipelines.conftest import REPO, every_epoch, tiny_overrides
from tpr_core.config import ConfigError
from tpr_core.experiment import load_config

SPACE = REPO / "tune_spaces" / "fmfa_demo.yaml"


def _cfg(synth_data, **extra):
    base = every_epoch(3, 2, distributed__num_workers=1, data__batch_size=16, train__log_every=1)
    base.update(extra)
    return load_config(
        REPO / "pipelines/configs/fmfa_synthetic_tiny.yaml", tiny_overrides(synth_data, **base)
    )


def _write_space(tmp_path, params, **top):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"metric": "best_val/R1", "mode": "max", **top, "params": params}))
    return p


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"loss.weights.efa_typo": {"uniform": [0, 1]}}, "loss.weights.efa_typo"),
        ({"loss.nope": {"uniform": [0, 1]}}, "unknown config key 'loss.nope'"),
        ({"loss.mlm_mask_ratio": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
        ({"loss.mlm_mask_ratio": {"uniform": [0.1, 1.5]}}, "loss.mlm_mask_ratio"),
        ({"loss.a_sdm_alpha": {"loguniform": [0, 10]}}, "positive low bound"),
        ({"distributed.zero_stage": {"randint": [0, 5]}}, "distributed.zero_stage"),
        ({"data.sampler": {"choice": ["random", "shuffled"]}}, "data.sampler"),
        ({"loss.weights.efa": {"uniform": [2, 1]}}, "low < high"),
    ],
)
def test_invalid_space_is_refused_before_anything_starts(synth_data, tmp_path, params, needle):
    from pipelines.sweep import sweep

    space = _write_space(tmp_path, params)
    with pytest.raises(ConfigError) as e:
        sweep(_cfg(synth_data), space, runs_dir=tmp_path / "runs", name="bad")
    assert needle in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_unknown_top_level_key_in_space(synth_data, tmp_path):
    from pipelines.space import load_space

    space = _write_space(tmp_path, {"loss.weights.efa": {"uniform": [0, 1]}}, schedular={"type": "asha"})
    with pytest.raises(ConfigError, match="schedular: unknown key"):
        load_space(space, _cfg(synth_data))


@pytest.mark.parametrize(
    "top, needle",
    [({"metric": "val/R1"}, "metric: Value error, 'val/R1': use 'best_val/R1'"), ({"mode": "min"}, "mode: Value error, 'min'")],
)
def test_a_space_optimises_the_running_best_val_r1_upwards(synth_data, tmp_path, top, needle):
    """Tune's best trial must be the one whose exported model is best (#19): the space's metric is
    the running best best_val/R1 every report carries, maximised; anything else is refused."""
    from pipelines.space import load_space

    space = _write_space(tmp_path, {"loss.weights.efa": {"uniform": [0, 1]}}, **top)
    with pytest.raises(ConfigError) as e:
        load_space(space, _cfg(synth_data))
    assert needle in str(e.value) and str(space) in str(e.value)


def test_shipped_spaces_validate():
    from pipelines.space import load_space

    for method in ("irra", "fmfa", "uit", "ivt"):
        space = load_space(
            REPO / f"tune_spaces/{method}.yaml",
            load_config(REPO / f"pipelines/configs/{method}_cuhk_base.yaml"),
        )
        assert space.params
    load_space(SPACE, load_config(REPO / "pipelines/configs/fmfa_synthetic_tiny.yaml"))


@pytest.mark.slow
def test_four_trial_asha_sweep_logs_parent_and_children(ray_local, synth_data, tmp_path, capfd):
    from mlflow import MlflowClient

    from pipelines.sweep import sweep
    from pipelines.tracking import BEST_TRIAL_TAG
    from pipelines.tracking_server import tracking_server

    # 2 epochs: ASHA's rungs (grace 1, factor 2) fall on epochs 1 and 2, the last one included
    out = sweep(_cfg(synth_data, train__epochs=2), SPACE, runs_dir=tmp_path, samples=4, name="sw")
    printed = "".join(capfd.readouterr())
    assert "View detailed results here" in printed  # Tune's own output is there (#19) ...
    for noise in ("To visualize your results with TensorBoard", "max_concurrent_trials", "Reporting training result"):
        assert noise not in printed, noise  # ... but not its TensorBoard hint, its ignored-limit warning, per-rank reports
    assert len(out["trials"]) == 4
    for r in out["trials"]:  # a rung on the last epoch must not cut off the final report
        assert r["status"] == ("DONE" if r["epochs"] == 2 else "STOPPED"), r
        assert (r["test/R1"] is not None) == (r["epochs"] == 2), r
    assert out["best_metric"] >= max(r["best_val/R1"] for r in out["trials"] if r["status"] == "DONE")
    assert set(out["best_params"]) == {"loss.weights.a_sdm", "loss.weights.efa", "loss.weights.id"}
    with tracking_server(tmp_path) as uri:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("tpr-synthetic")
        parent = client.get_run(out["parent_run_id"])
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(children) == 4
        # every trial row (stopped ones too) names its child run
        assert {r["mlflow_run_id"] for r in out["trials"]} == {c.info.run_id for c in children}
        assert parent.data.tags[BEST_TRIAL_TAG] in {c.info.run_id for c in children}
        assert parent.data.metrics["best/val/R1"] == pytest.approx(out["best_metric"])
        assert parent.data.params["space.search"] == "optuna"
        arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"trials.csv", "best_config.yaml", "model", "pictures"} <= arts
        for c in children:
            assert "train/loss" in c.data.metrics and "loss.weights.efa" in c.data.params
        # Tune ranks by the metric tpr exports by: a finished trial's score is its exported model's val R@1
        by_id = {c.info.run_id: c for c in children}
        for r in out["trials"]:
            if r["status"] == "DONE":
                model_dir = by_id[r["mlflow_run_id"]].data.tags["tpr.model_dir"]
                exported = json.loads(Path(model_dir, "metrics.json").read_text())
                assert r["best_val/R1"] == pytest.approx(exported["val/R1"]), r
        ended = {"DONE": "FINISHED", "STOPPED": "KILLED"}  # every trial's run ended, none RUNNING
        for r in out["trials"]:
            assert client.get_run(r["mlflow_run_id"]).info.status == ended[r["status"]], r


def test_a_trial_asha_stops_ends_killed_with_its_reason(ray_local, synth_data, tmp_path, monkeypatch):
    """Two 2-epoch trials one after the other, ranked on Tune's own report ``timestamp`` (mode
    min): at the rung of epoch 1 the second trial is behind the first by construction, so ASHA
    stops it. Its MLflow run ends KILLED, with an end time and the reason; the finished trial's,
    FINISHED. A space file may only name ``best_val/R1``, so the test swaps the metric in after
    the file is checked: the sweep's machinery is the same, only the ranking is made certain."""
    from mlflow import MlflowClient

    from pipelines import sweep as sweep_mod
    from pipelines.space import load_space
    from pipelines.tracking import DESCRIPTION_TAG
    from pipelines.tracking_server import tracking_server

    def by_timestamp(path, base):
        return load_space(path, base).model_copy(update={"metric": "timestamp", "mode": "min"})

    monkeypatch.setattr(sweep_mod, "load_space", by_timestamp)
    sweep = sweep_mod.sweep
    space = _write_space(
        tmp_path, {"loss.weights.id": {"choice": [1.0]}}, search="random",
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    cfg = _cfg(synth_data, train__epochs=2, train__max_steps_per_epoch=1)
    out = sweep(cfg, space, runs_dir=tmp_path, samples=2, max_concurrent=1, name="asha")
    status = {r["status"]: r for r in out["trials"]}
    assert sorted(status) == ["DONE", "STOPPED"], out["trials"]
    assert status["STOPPED"]["epochs"] == 1
    with tracking_server(tmp_path) as uri:
        client = MlflowClient(uri)
        stopped = client.get_run(status["STOPPED"]["mlflow_run_id"])
        done = client.get_run(status["DONE"]["mlflow_run_id"])
    assert stopped.info.status == "KILLED"
    assert stopped.info.end_time is not None and stopped.info.end_time >= stopped.info.start_time
    assert "Stopped by the ASHA scheduler after epoch 1" in stopped.data.tags[DESCRIPTION_TAG]
    assert done.info.status == "FINISHED" and done.info.end_time >= done.info.start_time


def test_resume_of_unknown_sweep_is_refused_before_anything_starts(synth_data, tmp_path):
    from pipelines.sweep import sweep

    with pytest.raises(ConfigError, match="no sweep named 'nope' to resume"):
        sweep(_cfg(synth_data), SPACE, runs_dir=tmp_path / "runs", name="nope", resume=True)
    assert not (tmp_path / "runs" / "mlflow").exists()
