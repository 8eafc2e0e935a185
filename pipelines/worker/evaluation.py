"""Evaluation inside the worker group: ``tpr_core.eval``'s encode-and-rank path, each rank
encoding its share through the DeepSpeed engine and the features all-gathered."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipelines.worker.engine import engine_encoder
from tpr_core.config import ExperimentConfig
from tpr_core.eval import EvalResult, encode_split, rank_encoded


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``tpr_core.eval.Gather`` across the process group)."""
    _, world = _rank_world()
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def distributed_evaluate(
    engine: Any, split_data: Any, tokenizer: Any, cfg: ExperimentConfig, device: torch.device, topk: int = 0
) -> EvalResult:
    """Every rank encodes its share of the split's gallery and queries; the features are
    gathered, ranked once on rank 0 and the result shared (all ranks must call).

    Returns:
        The same :class:`~tpr_core.eval.EvalResult` on every rank (top-``topk`` lists if asked).
    """
    rank, world = _rank_world()
    batch_size = max(1, cfg.data.eval_batch_size // world)
    images, texts = encode_split(
        engine_encoder(engine, device), split_data, tokenizer, cfg.model.image_size, cfg.model.text_length,
        batch_size, rank=rank, world=world, gather=all_gather, progress="evaluating" if rank == 0 else None,
    )
    result: list[Any] = [rank_encoded(images, texts, return_topk=topk) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]
