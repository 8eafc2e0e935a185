"""Helpers of the registry and serving tests: a small synthetic dataset and tiny models of
really different quality, exported and logged the way the training pipeline does it.

The "trained" model is trained (SDM loss, full batch) on the split it is later evaluated and
searched on, for a few dozen steps: that gives a real, large quality gap over an untrained
model in seconds of CPU time. Generalisation to unseen identities is the training pipeline's
test, not the registry's.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipelines.env import scoped_env
from tpr_core.eval.metrics import REPORTED_METRICS

REPO = Path(__file__).resolve().parents[2]
SPLIT = "val"
_CACHE = Path(tempfile.mkdtemp(prefix="tpr-registry-fixtures-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@functools.cache
def _shared_server() -> str:
    """One real tracking server for all registry/serving test modules of this process.

    Started on first use and stopped at interpreter exit; the environment is left untouched
    here (see :func:`tracking_uri`), so other test modules never log to it by accident.
    """
    from pipelines.tracking_server import tracking_server

    stack = contextlib.ExitStack()
    with scoped_env(MLFLOW_TRACKING_URI=None):  # the server's own setting ends with this block
        uri = stack.enter_context(tracking_server(_CACHE / "runs"))
    atexit.register(stack.close)
    return uri


@contextlib.contextmanager
def tracking_uri() -> Iterator[str]:
    """Point MLflow at the shared test server for the duration (restores the variable after)."""
    uri = _shared_server()
    with scoped_env(MLFLOW_TRACKING_URI=uri):
        yield uri


@functools.cache
def dataset() -> dict[str, str]:
    """60 identities x 2 images x 2 captions (val: 9 identities, 18 images, 36 captions); built once."""
    from tpr_core.data.prepare import prepare
    from tpr_core.data.synth import generate

    raw, parquet = _CACHE / "raw", _CACHE / "parquet"
    generate(raw, identities=60, images_per_identity=2, captions_per_image=2, seed=0, size=(64, 32))
    prepare("cuhk-pedes", raw, parquet)
    return {"raw": str(raw), "root": str(parquet)}


def config():
    from tpr_core.experiment import load_config

    return load_config(
        REPO / "pipelines" / "configs" / "irra_synthetic_tiny.yaml",
        {
            "data.root": dataset()["root"],
            "model.image_size": [32, 16],
            "model.text_length": 48,
            "model.cross_depth": 1,
            "data.eval_batch_size": 64,
            "data.batch_size": 32,
            "distributed.num_workers": 1,
            "tracking.experiment": "tpr-registry-tests",
        },
    )


@functools.cache
def tokenizer():
    from tpr_core.data.dataset import load_split
    from tpr_core.data.tokenizer import Tokenizer

    train = load_split(dataset()["root"], "train")
    return Tokenizer.train([train.caption(i) for i in range(len(train))], vocab_size=1000, max_length=48)


def _evaluate(model, cfg, tok, split: str) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from tpr_core.data.dataset import GalleryDataset, QueryDataset, collate, load_split
    from tpr_core.eval import evaluate

    data = load_split(cfg.data.root, split)
    bs = cfg.data.eval_batch_size
    images = DataLoader(GalleryDataset(data, tuple(cfg.model.image_size)), batch_size=bs, collate_fn=collate)
    texts = DataLoader(QueryDataset(data, tok, cfg.model.text_length), batch_size=bs, collate_fn=collate)
    m = evaluate(model, images, texts).metrics
    return {f"{split}/{k}": float(m[k]) for k in REPORTED_METRICS}


@functools.cache
def exported_model(kind: str) -> str:
    """An exported model folder: ``untrained`` (seed 0) or ``trained`` (SDM on the val split)."""
    from tpr_core import losses
    from tpr_core.data.dataset import TrainDataset, collate, load_split
    from tpr_core.export import save_exported
    from tpr_core.models import build_method

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, tok = config(), tokenizer()
        data = load_split(cfg.data.root, SPLIT)
        torch.manual_seed(0)
        model = build_method(cfg, data.num_identities, tok)
        if kind == "trained":
            ds = TrainDataset(data, tok, tuple(cfg.model.image_size), cfg.model.text_length, augment=False)
            batch = collate([ds[i] for i in range(len(ds))])  # the whole split: 36 pairs
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            model.train()
            for _ in range(70):
                v = model.encode_image(batch["images"])  # (B, D)
                t = model.encode_text(batch["text_ids"], batch["text_mask"])  # (B, D)
                loss = losses.sdm(v, t, batch["pids"], temperature=cfg.loss.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
        elif kind != "untrained":
            raise ValueError(kind)
        model.eval()
        metrics = _evaluate(model, cfg, tok, SPLIT)
        out = _CACHE / f"export-{kind}"
        save_exported(out, model.state_dict(), cfg, tok, metrics, data.num_identities,
                      extra={"manifest_hash": "fixture", "git_commit": "0" * 40})  # fmt: skip
        return str(out)
    finally:
        torch.set_num_threads(threads)


def log_training_run(kind: str, experiment: str = "tpr-registry-tests") -> str:
    """A finished MLflow run shaped like a training run: tags, the dataset as input, and the
    exported folder as its logged model ``model`` with the val metrics linked to it."""
    from pipelines import tracking
    from pipelines.worker.tracker import BEST_MODEL_NAME
    from tpr_core.data.store import read_manifest

    folder = Path(exported_model(kind))
    metrics = json.loads((folder / "metrics.json").read_text())
    run_id = tracking.start_or_resume_run(
        experiment,
        run_key=f"{kind}-{np.random.default_rng().integers(1 << 62)}",
        run_name=f"train-{kind}",
        tags={"method": "irra", "dataset_manifest_hash": "fixture", "git_commit": "0" * 40},
    )
    data = tracking.prepared_dataset(dataset()["root"], read_manifest(dataset()["root"]), "synthetic")
    tracking.log_dataset_input(run_id, data)
    tracking.log_folder_model(run_id, folder, BEST_MODEL_NAME, [(metrics, 1)], dataset=data)
    tracking.set_terminated(run_id, "FINISHED")
    return run_id


def describe_identity(orig_id: int, seed: int = 12345) -> str:
    """A fresh description of a synthetic identity, written from its attributes (not a dataset caption)."""
    from tpr_core.data.synth import describe

    attrs = json.loads((Path(dataset()["raw"]) / "attributes.json").read_text())[str(orig_id)]
    return describe(attrs, np.random.default_rng(seed + orig_id))


@functools.cache
def val_images() -> tuple[str, dict[str, int]]:
    """The val split's 18 images as plain files under one folder (at their dataset paths), and
    the person (``orig_id``) of each path: a folder of "your own images" for ``tpr index``."""
    from tpr_core.data.dataset import load_split
    from tpr_core.data.store import load_split_table

    root = dataset()["root"]
    data = load_split(root, SPLIT)
    t = load_split_table(root, SPLIT, columns=["image_path", "orig_id"])
    person = dict(zip(t.column("image_path").to_pylist(), t.column("orig_id").to_pylist(), strict=True))
    folder = _CACHE / "val-images"
    first_row = np.searchsorted(data.image_rows, np.arange(data.num_images))
    for u in range(data.num_images):
        file = folder / data.image_path(int(first_row[u]))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data.image_bytes(u))
    return str(folder), {p: int(o) for p, o in person.items()}
