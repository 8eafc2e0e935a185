"""The end of a training: the probe embeddings, the consolidated weights, the exported model,
and what rank 0 logs with it (config, pictures, model)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelines.job import WorkerJob
from pipelines.storage import is_uri, upload_dir
from pipelines.worker.engine import engine_encoder
from pipelines.worker.tracker import Tracker
from tpr_core.config import ExperimentConfig
from tpr_core.eval import EvalResult

PROBE_SIZE = 8  # images and captions in the probe


@torch.no_grad()
def probe_embeddings(engine: Any, data: Any, tokenizer: Any, cfg: ExperimentConfig, device: torch.device) -> dict:
    """The engine's embeddings of a fixed probe (first 8 test images and captions), so a test
    can check that the exported model, loaded in one process, gives the same ones."""
    from tpr_core.data.dataset import GalleryDataset, QueryDataset, collate

    encoder = engine_encoder(engine, device)
    was = engine.module.training
    engine.module.eval()
    try:
        g = GalleryDataset(data, tuple(cfg.model.image_size), positions=range(min(PROBE_SIZE, data.num_images)))
        q = QueryDataset(data, tokenizer, cfg.model.text_length, positions=range(min(PROBE_SIZE, len(data))))
        gb = collate([g[i] for i in range(len(g))])
        qb = collate([q[i] for i in range(len(q))])
        img = encoder.forward({k: v.to(device) for k, v in gb.items()}, "image").float().cpu()
        txt = encoder.forward({k: v.to(device) for k, v in qb.items()}, "text").float().cpu()
    finally:
        engine.module.train(was)
    return {"images": gb["images"].float().contiguous(), "image_feats": img.contiguous(),
            "text_ids": qb["text_ids"].contiguous(), "text_mask": qb["text_mask"].contiguous(),
            "text_feats": txt.contiguous()}


def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of the method on rank 0 (all ranks must call: ZeRO-3 gathers)."""
    module = engine.module.method
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        return sd
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def export_and_log(
    job: WorkerJob, state_dict: dict, tokenizer: Any, num_classes: int,
    metrics: dict, val_best: EvalResult, val_data: Any, tracker: Tracker, test_step: int,
) -> str | None:
    """Export the model to ``job.model_dir`` (with ``metrics``, its numbers), then log the
    config, the pictures of ``val_best`` and the model to the tracker's run (rank 0): the model
    as the run's logged model, its val metrics (at the best epoch's step) and test metrics (at
    ``test_step``) linked to it. Returns the logged model's id (None without tracking)."""
    from tpr_core.config import dump_config
    from tpr_core.export import save_exported

    cfg = job.cfg
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    extra = {
        "dataset_manifest_hash": job.manifest_hash, "run_name": job.run_name,
        "data_root": cfg.data.root, "git_commit": job.git_commit,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # A runs dir on object storage: the export is written here, then uploaded.
        local_model = Path(tmp, "model") if is_uri(job.model_dir) else job.model_dir
        save_exported(local_model, state_dict, cfg, tokenizer, numbers, num_classes, extra=extra)
        if is_uri(job.model_dir):
            upload_dir(local_model, job.model_dir)
        if not tracker.enabled:
            return None
        cpath = Path(tmp, "config.yaml")
        cpath.write_text(dump_config(cfg))
        tracker.artifact(cpath)
        try:
            pics = Path(tmp, "pictures")
            pics.mkdir()
            _pictures(val_best, val_data, pics)
            for png in sorted(pics.glob("*.png")):
                tracker.artifact(png, "pictures")
        except Exception as e:  # pictures must never fail a finished training
            print(f"[tpr] warning: could not draw pictures: {e}", flush=True)
        val = {k: v for k, v in numbers.items() if k.startswith("val/")}
        test = {k: v for k, v in numbers.items() if k.startswith("test/")}
        return tracker.log_best_model(local_model, val, int(metrics.get("step", test_step)), test, test_step)


def _pictures(res: EvalResult, data: Any, out: Path) -> None:
    """The retrieval grid of 6 chosen val queries (top 10) and the Recall@K curve."""
    from tpr_core.eval import recall_curve, retrieval_grid_from_ranks

    captions = [data.caption(i) for i in range(len(data))]
    retrieval_grid_from_ranks(res.t2i, captions, data.image_bytes, out / "retrieval_grid.png", n=6, k=10)
    recall_curve(res.t2i, out / "recall_at_k.png")
