"""tpr train end to end on CPU: real Ray (2 workers), real DeepSpeed over gloo, real MLflow."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.pipelines.conftest import REPO, every_epoch, tiny_overrides
from tpr_core.config import ConfigError
from tpr_core.experiment import load_config

pytestmark = pytest.mark.slow


def _cfg(name, synth_data, **extra):
    return load_config(
        REPO / f"pipelines/configs/{name}_synthetic_tiny.yaml", tiny_overrides(synth_data, **extra)
    )


def _chance_r1(root: str) -> float:
    """Expected R@1 (percent) of a random ranking on the val split: mean over queries of matches / G."""
    from tpr_core.data.dataset import load_split

    val = load_split(root, "val")
    counts = np.bincount(val.image_pids)
    return 100.0 * float(np.mean(counts[val.pids] / val.num_images))


@contextlib.contextmanager
def _mlflow(runs_dir: Path):
    """A client of the run's own store, through the same loopback server the run used."""
    from pipelines.tracking_server import tracking_server

    with tracking_server(runs_dir) as uri:
        yield MlflowClient(tracking_uri=uri)


def _runs(client: MlflowClient, experiment: str, key: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`tpr.run_key` = '{key}'")


def test_zero2_two_workers_learns_and_tracks(ray_local, synth_data, tmp_path):
    from pipelines.train import train

    cfg = _cfg(
        "irra",
        synth_data,
        train__epochs=6,
        train__eval_every=2,
        train__checkpoint_every=2,
        train__log_every=5,
        distributed__zero_stage=2,
        tracking__system_metrics_interval_s=1,
    )
    m = train(cfg, runs_dir=tmp_path, name="z2")
    chance = _chance_r1(synth_data["root"])
    print(f"\nval R@1 {m['best/val_R1']:.2f} vs chance {chance:.2f}; test R@1 {m['test/R1']:.2f}")
    assert m["best/val_R1"] >= 5 * chance
    for k in ("test/R1", "test/R5", "test/R10", "test/mAP", "test/mINP"):
        assert 0.0 <= m[k] <= 100.0

    run_dir = tmp_path / "ray" / "z2"
    ckpts = sorted(p.name for p in run_dir.glob("epoch-*"))
    assert 1 <= len(ckpts) <= cfg.train.keep_best, ckpts
    for c in ckpts:
        d = run_dir / c
        assert (d / "trainer_state.json").is_file() and (d / "state" / "latest").is_file()
        assert {p.name for p in (d / "rng").iterdir()} == {"rank-0.pt", "rank-1.pt"}
    model = Path(m["model_dir"])
    assert {p.name for p in model.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "config.yaml",
        "tokenizer.json",
        "metrics.json",
    }
    resolved = load_config(model / "config.yaml")
    assert (model / "config.yaml").read_text().startswith("# derived: 32 samples per worker")
    assert resolved.method == "irra" and resolved.distributed.zero_stage == 2
    assert json.loads((model / "metrics.json").read_text())["test/R1"] == pytest.approx(m["test/R1"])

    with _mlflow(tmp_path) as client:
        _check_z2_run(client, cfg, m)


def _check_z2_run(client, cfg, m):
    runs = _runs(client, cfg.tracking.experiment, "z2")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == m["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["loss.weights.sdm"] == "1.0" and run.data.params["distributed.zero_stage"] == "2"
    # the global batch of 64 the losses compare, and each of the 2 workers' share of it
    assert run.data.params["loss.gather"] == "global" and run.data.params["data.batch_size"] == "64"
    assert run.data.params["derived.batch_size_per_worker"] == "32" and run.data.params["derived.loss_batch"] == "64"
    assert run.data.tags["method"] == "irra" and run.data.tags["dataset_manifest_hash"].startswith("sha256:")
    for key in (
        "train/loss",
        "train/sdm",
        "train/id",
        "train/mlm",
        "train/lr",
        "val/R1",
        "val/mINP",
        "test/R1",
    ):
        assert key in run.data.metrics, key
    steps = [h.step for h in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 5
    losses = [h.value for h in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses[-1] < losses[0]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "pictures"} <= arts
    _check_z2_logged_model(client, run, cfg, m)
    pics = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert {"pictures/retrieval_grid.png", "pictures/recall_at_k.png"} <= pics


def _check_z2_logged_model(client, run, cfg, m):
    """The run's MLflow 3 record: its best checkpoint as a logged model with the val (best
    epoch) and test metrics linked to it and to the dataset, the dataset as the run's input,
    system metrics, a description, MLflow's source tags."""
    from tpr_core.data.store import read_manifest

    run_id = run.info.run_id
    manifest = read_manifest(cfg.data.root)
    [inp] = run.inputs.dataset_inputs
    ds = inp.dataset
    assert (ds.name, ds.digest) == (cfg.data.format, manifest["content_hash"].split(":")[-1][:12])
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    assert json.loads(ds.source)["uri"].endswith("parquet") and json.loads(ds.profile) == manifest["counts"]
    assert "caption" in ds.schema
    [out] = run.outputs.model_outputs
    model = client.get_logged_model(out.model_id)
    assert (model.name, model.source_run_id, model.status.to_int()) == ("model", run_id, 2)  # READY
    assert model.params["loss.weights.sdm"] == "1.0" and model.model_type == "irra"
    linked = {mt.key: mt for mt in model.metrics}
    assert linked["val/R1"].value == pytest.approx(m["best/val_R1"])
    assert linked["test/R1"].value == pytest.approx(m["test/R1"])
    # linked at the step the best epoch was evaluated, the same point as the run's own
    assert any(h.step == linked["val/R1"].step and not h.model_id and h.value == pytest.approx(m["best/val_R1"])
               for h in client.get_metric_history(run_id, "val/R1"))  # fmt: skip
    for mt in linked.values():
        assert (mt.run_id, mt.dataset_name, mt.dataset_digest) == (run_id, ds.name, ds.digest)
    exported = {p.path for p in client.list_logged_model_artifacts(model.model_id)}
    assert {"model.safetensors", "config.json", "config.yaml", "tokenizer.json", "metrics.json"} <= exported
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"IRRA trained on {cfg.data.format} data") and f"models:/{model.model_id}" in note
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40


def test_zero3_export_matches_engine_embeddings(ray_local, synth_data, tmp_path, monkeypatch):
    """Also the runs dir given as a URI (file://): tokenizer, export and result go through
    pyarrow.fs as they do to s3://, and workers read the tokenizer from there."""
    from safetensors.torch import load_file

    from pipelines.storage import local_dir
    from pipelines.train import train
    from tpr_core.export import load_exported

    monkeypatch.chdir(tmp_path)  # a URI runs dir keeps the embedded MLflow store in the cwd

    cfg = _cfg(
        "irra",
        synth_data,
        train__epochs=4,
        train__eval_every=2,
        train__checkpoint_every=2,
        distributed__zero_stage=3,
    )
    m = train(cfg, runs_dir=f"file://{tmp_path}", name="z3")
    chance = _chance_r1(synth_data["root"])
    print(f"\nZeRO-3: val R@1 {m['best/val_R1']:.2f} vs chance {chance:.2f}; test R@1 {m['test/R1']:.2f}")
    assert m["best/val_R1"] >= 5 * chance
    assert m["model_dir"] == f"file://{tmp_path}/ray/z3/model"
    assert (tmp_path / "ray" / "z3" / "tokenizer" / "tpr_tokenizer.json").is_file()
    assert not (tmp_path / "tokenizers").exists()
    probe = load_file(tmp_path / "ray" / "z3" / "probe.safetensors")
    exp = load_exported(local_dir(m["model_dir"], cache_root=tmp_path / "cache"))
    with torch.no_grad():
        img = exp.model.encode_image(probe["images"])
        txt = exp.model.encode_text(probe["text_ids"], probe["text_mask"])
    torch.testing.assert_close(img, probe["image_feats"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, probe["text_feats"], rtol=1e-4, atol=1e-5)
    # ZeRO-3 really sharded: each rank's checkpoint holds only its partition of the weights
    ckpt = sorted((tmp_path / "ray" / "z3").glob("epoch-*"))[-1] / "state" / "state"
    assert len(list(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2


class DieAfterEpoch:
    """A worker's train function: the real loop, whose last rank kills its own process right
    after reporting epoch ``epoch`` (once: the marker file records it). It wraps
    ``ray.train.report`` inside the worker process, so the loop itself carries no test hook."""

    def __init__(self, epoch: int, marker: Path) -> None:
        self.epoch = epoch
        self.marker = marker

    def __call__(self, loop_config: dict) -> None:
        import os

        import ray.train

        from pipelines.worker import train_loop

        report = ray.train.report

        def report_then_die(metrics: dict, *args, **kwargs) -> None:
            report(metrics, *args, **kwargs)
            ctx = ray.train.get_context()
            last_rank = ctx.get_world_rank() == ctx.get_world_size() - 1
            if metrics.get("epoch") == self.epoch and "test/R1" not in metrics and last_rank:
                if not self.marker.exists():
                    self.marker.write_text("killed")
                    os._exit(1)

        ray.train.report = report_then_die
        try:
            train_loop(loop_config)
        finally:
            ray.train.report = report


def test_same_name_after_a_crash_resumes(ray_local, synth_data, tmp_path):
    from pipelines.train import train

    cfg = _cfg(
        "irra",
        synth_data,
        **every_epoch(2, 2, train__log_every=1, distributed__max_failures=0),
    )
    marker = tmp_path / "killed"
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        train(cfg, runs_dir=tmp_path, name="crash", train_fn=DieAfterEpoch(1, marker))
    assert marker.exists()
    with _mlflow(tmp_path) as client:  # the failed training's run ends FAILED, with the reason
        [run] = _runs(client, cfg.tracking.experiment, "crash")
        assert run.info.status == "FAILED" and run.info.end_time, run.info
        assert "Failed: " in run.data.tags["mlflow.note.content"], run.data.tags["mlflow.note.content"]
    m = train(cfg, runs_dir=tmp_path, name="crash")
    assert m["test/R1"] >= 0
    with _mlflow(tmp_path) as client:
        runs = _runs(client, cfg.tracking.experiment, "crash")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        steps = [h.step for h in client.get_metric_history(runs[0].info.run_id, "train/loss")]
        assert steps == [1, 2, 3, 4]


def test_bad_input_fails_before_ray(synth_data, tmp_path):
    from pipelines.train import train

    with pytest.raises(ConfigError, match="distributed.precision=fp16"):
        train(_cfg("irra", synth_data, distributed__precision="fp16"), runs_dir=tmp_path, name="x")
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        cfg = load_config(
            REPO / "pipelines/configs/irra_cuhk_base.yaml",
            [
                f"data.root={tmp_path / 'nothing'}",
                "model.pretrained=null",
                "distributed.use_gpu=false",
                "distributed.precision=fp32",
                "distributed.num_workers=1",  # the base config's 4 x 8 CPUs are refused on 2 cores
                "distributed.cpus_per_worker=1",
            ],
        )
        train(cfg, runs_dir=tmp_path, name="x")
    with pytest.raises(ConfigError, match="model.pretrained"):
        train(_cfg("irra", synth_data, model__pretrained=str(tmp_path)), runs_dir=tmp_path, name="x")
    assert not (tmp_path / "ray").exists()  # nothing was started


def test_first_step_of_two_workers_equals_one_worker(ray_local, synth_data, tmp_path):
    """Through the real loop (Ray Train, DeepSpeed ZeRO-2 over gloo): from the same initial weights,
    the first optimizer step of 2 workers moves every weight as 1 worker on the same 64 samples does.
    Both accumulate two micro-batches (grad_accum 2): each global micro-batch of 32 is 2 x 16 rows
    gathered for the batch-level terms on 2 workers, one block of 32 on 1 worker.

    SGD without momentum and without clipping, so the update is the gradient times the learning
    rate and nothing magnifies rounding (a clipped step also rescales by the gradient norm, itself
    summed in a different order); not Adam, whose first step is about lr x sign(g) and turns float
    noise in a near-zero gradient into a full-size difference. The two runs sum the same products in
    different orders (two halves all-reduced over gloo against one pass), so they agree to float32
    rounding of the gradient: measured 3-4e-7 against largest updates of 0.44-0.76, inside atol = 1e-5 x
    the largest update (rtol 1e-3). That the same comparison fails with ``loss.gather=local`` is
    shown for every method in ``tests/tpr_core/test_global_batch.py`` (a third training here would
    cost another minute of the suite).
    """
    from safetensors.torch import load_file

    from pipelines.train import train
    from pipelines.worker.checkpoints import seed_all
    from tpr_core.data.dataset import load_split, train_identity_count
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.models import build_method

    over = dict(
        train__epochs=1, train__max_steps_per_epoch=1, train__eval_every=1, train__checkpoint_every=1,
        distributed__zero_stage=2, distributed__grad_accum=2, optim__name="sgd", optim__momentum=0.0,
        optim__lr=0.5, optim__weight_decay=0.0,
        optim__grad_clip=0.0,  # the tiny configs clip at 1.0: the plain gradient step is compared
    )

    def update(name: str, **extra: object) -> dict[str, torch.Tensor]:
        cfg = _cfg("fmfa", synth_data, **over, **extra)
        m = train(cfg, runs_dir=tmp_path, name=name)
        after = load_file(Path(m["model_dir"]) / "model.safetensors")
        tok = Tokenizer.load(tmp_path / "tokenizers" / name)
        seed_all(cfg.train.seed)  # as every worker does before building the model
        init = build_method(cfg, train_identity_count(load_split(cfg.data.root, "train")), tok).state_dict()
        return {k: after[k] - init[k] for k in init}

    two, one = update("step2", distributed__num_workers=2), update("step1", distributed__num_workers=1)
    scale = max(float(d.abs().max()) for d in one.values())
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    print(f"\nfirst step: largest update {scale:.3e}, largest 2-vs-1-worker difference {worst:.3e}")
    assert scale > 1e-4  # the step moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-5 * scale, msg=k)
