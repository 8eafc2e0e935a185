"""The worker's checkpoints: save one, report it to Ray Train, resume from one, pick the best,
and the per-rank RNG state they carry (layout in ``pipelines.worker``)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_TAG = "state"  # DeepSpeed's folder and tag inside a checkpoint
TRAINER_STATE_FILE = "trainer_state.json"


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and ints (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def resume(engine: Any, state: dict[str, Any], rank: int) -> None:
    """Load Ray Train's latest checkpoint, if any: the engine (optimizer and schedule
    included), ``state`` updated from the trainer state, and this rank's RNG state."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as cdir:
        engine.load_checkpoint(os.path.join(cdir, STATE_TAG), tag=STATE_TAG)
        state.update(json.loads(Path(cdir, TRAINER_STATE_FILE).read_text()))
        rng_file = Path(cdir, "rng", f"rank-{rank}.pt")
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
    if rank == 0:
        from pipelines.terminal import log

        log.info(f"[tpr] resumed from checkpoint at epoch {state['epoch']} (step {state['step']})")


def save_checkpoint(engine: Any, state: dict, rank: int) -> str:
    """This rank's share of a checkpoint (engine, RNG, and on rank 0 the trainer state) in a new
    temporary directory (all ranks must call: ZeRO saves collectively)."""
    tmp = tempfile.mkdtemp(prefix=f"tpr-ckpt-r{rank}-")
    try:
        engine.save_checkpoint(os.path.join(tmp, STATE_TAG), tag=STATE_TAG)
        Path(tmp, "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), Path(tmp, "rng", f"rank-{rank}.pt"))
        if rank == 0:
            Path(tmp, TRAINER_STATE_FILE).write_text(json.dumps(state))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def report_checkpoint(metrics: dict, tmp: str, epoch: int) -> None:
    """Report ``metrics`` with the checkpoint in ``tmp`` (from :func:`save_checkpoint`), then remove ``tmp``."""
    import ray.train

    try:
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch-{epoch:04d}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def best_reported() -> tuple[Any, dict] | None:
    """(checkpoint, metrics) of the reported checkpoint with the highest val/R1 (the earliest
    of equal ones), or None."""
    import ray.train

    best = None
    for rc in ray.train.get_all_reported_checkpoints():
        r1 = rc.metrics.get("val/R1")
        if r1 is None:
            continue
        if best is None or r1 > best[1]["val/R1"]:
            best = (rc.checkpoint, rc.metrics)
    return best


def load_best(engine: Any, last_metrics: dict | None, epoch: int, model_dir: str) -> dict:
    """Give the engine the run's best weights by val/R1; returns that epoch's metrics.

    The engine holds the weights of epoch ``epoch``, whose metrics are ``last_metrics`` when
    this run trained it (None after resuming from the final checkpoint). A reported checkpoint
    replaces them only when its val/R1 is strictly higher (of equal ones, the earliest epoch wins).
    """
    best = best_reported()
    if last_metrics is not None and (best is None or last_metrics["val/R1"] > best[1]["val/R1"]):
        return last_metrics
    if best is None:
        raise RuntimeError(f"run {model_dir}: no trained epoch and no checkpoint to evaluate")
    if best[1].get("epoch") != epoch:
        with best[0].as_directory() as cdir:
            engine.load_checkpoint(
                os.path.join(cdir, STATE_TAG), tag=STATE_TAG,
                load_optimizer_states=False, load_lr_scheduler_states=False,
            )
    return best[1]
