"""Evaluation of an exported model on one split of a prepared dataset, in one process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.registry.common import manifest_hash


@dataclass
class EvalOutcome:
    """Metrics of an exported model on one split, and what is needed to draw them."""

    metrics: dict[str, float]
    result: Any  # tpr_core.eval.EvalResult
    split_data: Any  # tpr_core.data.dataset.SplitData
    data_root: str
    manifest_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_exported(
    exported: Any, data_root: str | None = None, split: str = "val", topk: int = 0, split_data: Any = None
) -> EvalOutcome:
    """Evaluate a loaded exported model on one split of a prepared dataset (single process).

    Args:
        exported: a ``tpr_core.export.Exported``.
        data_root: prepared dataset; default the model's ``cfg.data.root``.
        split: ``train``, ``val`` or ``test``.
        topk: also keep the top-k gallery indices per query (for pictures).
        split_data: an already loaded split (same root and split), to avoid reading it twice.

    Returns:
        An :class:`EvalOutcome` with ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP`` (percent).
    """
    from tpr_core.data.dataset import load_split
    from tpr_core.eval import evaluate_split

    cfg = exported.cfg
    root = str(data_root or cfg.data.root)
    data = split_data if split_data is not None else load_split(root, split)
    result = evaluate_split(
        exported.model,
        data,
        exported.tokenizer,
        cfg.model.image_size,
        cfg.model.text_length,
        cfg.data.eval_batch_size,
        return_topk=topk,
        progress=f"evaluating on {split}",
    )
    metrics = {k: float(v) for k, v in result.metrics.items()}
    return EvalOutcome(metrics, result, data, root, manifest_hash(root))
