"""Evaluation: exact retrieval metrics, the single-process evaluator, and retrieval pictures."""

from tpr_core.eval.evaluator import (
    Encoded,
    EvalResult,
    encode_images,
    encode_texts,
    evaluate,
    evaluate_features,
)
from tpr_core.eval.metrics import (
    REPORTED_METRICS,
    QueryRanks,
    cmc_curve,
    rank_gallery,
    rank_gallery_from_features,
    retrieval_metrics,
    retrieval_metrics_from_features,
)
from tpr_core.eval.pictures import (
    MATCH_COLOR,
    MISMATCH_COLOR,
    choose_queries,
    recall_curve,
    retrieval_grid,
    retrieval_grid_from_ranks,
)

__all__ = [
    "MATCH_COLOR",
    "MISMATCH_COLOR",
    "REPORTED_METRICS",
    "Encoded",
    "EvalResult",
    "QueryRanks",
    "choose_queries",
    "cmc_curve",
    "encode_images",
    "encode_texts",
    "evaluate",
    "evaluate_features",
    "rank_gallery",
    "rank_gallery_from_features",
    "recall_curve",
    "retrieval_grid",
    "retrieval_grid_from_ranks",
    "retrieval_metrics",
    "retrieval_metrics_from_features",
]
