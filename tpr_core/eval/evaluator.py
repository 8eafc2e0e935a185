"""Evaluate a retrieval model on one split: encode the gallery and the queries, then rank.

Single-process. The distributed variant (each worker encodes a share, then gathers)
lives with the training loop; after gathering it calls :func:`evaluate_features`,
which is also what :func:`evaluate` calls after encoding.

Gallery images come from a table with one row per (image, caption), and samplers may pad
a split to divide evenly among workers, so both sides can hold repeated rows. When ids are
given (``image_ids`` in image batches, ``index`` in text batches) repeats are dropped,
keeping the first occurrence, so each image and each caption counts once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from tpr_core.eval.metrics import QueryRanks, rank_gallery_from_features

__all__ = ["Encoded", "EvalResult", "encode_images", "encode_texts", "evaluate", "evaluate_features"]


class Encoded(NamedTuple):
    """Features of one side of a split, in batch order.

    Attributes:
        feats: (N, D) float32 features, not normalised, on the encoding device.
        pids: (N,) long person ids, on CPU.
        ids: per-row ids (``image_ids`` for images, ``index`` for texts) when the batches
            carry them, else None; a (N,) tensor or a list (e.g. string image ids).
    """

    feats: torch.Tensor
    pids: torch.Tensor
    ids: torch.Tensor | list | None


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation.

    Attributes:
        metrics: ``R{k}``, ``mAP``, ``mINP`` (percent) and ``num_queries``,
            ``num_valid_queries``, ``num_gallery`` for text-to-image; the same keys prefixed
            with ``i2t_`` when image-to-text was asked for.
        t2i: per-caption ranks of the gallery images (top-k lists when asked for).
        i2t: per-image ranks of the captions, or None.
        image_ids: ids of the gallery images in gallery order (after de-duplication), or None.
        text_ids: ids of the queries in query order (after de-duplication), or None.
        image_pids: (G,) pids of the gallery images.
        text_pids: (Q,) pids of the queries.
    """

    metrics: dict[str, float]
    t2i: QueryRanks
    i2t: QueryRanks | None
    image_ids: torch.Tensor | list | None
    text_ids: torch.Tensor | list | None
    image_pids: torch.Tensor
    text_pids: torch.Tensor


def encode_images(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str | None = None
) -> Encoded:
    """Encode image batches with ``model.encode_image`` (eval mode, no grad).

    Args:
        model: module with ``encode_image(images) -> (B, D)``.
        batches: dicts with ``images`` (B, 3, H, W), ``pids`` (B,) and optionally ``image_ids``.
        device: where to run the model; default: the device of the model's parameters.

    Returns:
        Features (on ``device``), pids and image ids (None when the batches have none).
    """
    return _encode(model, batches, device, "images", lambda m, b: m.encode_image(b["images"]), "image_ids")


def encode_texts(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str | None = None
) -> Encoded:
    """Encode caption batches with ``model.encode_text`` (eval mode, no grad).

    Args:
        model: module with ``encode_text(text_ids, text_mask) -> (B, D)``.
        batches: dicts with ``text_ids`` (B, L), ``text_mask`` (B, L), ``pids`` (B,) and
            optionally ``index`` (B,) row index in the split.
        device: where to run the model; default: the device of the model's parameters.

    Returns:
        Features (on ``device``), pids and row indices (None when the batches have none).
    """
    return _encode(
        model, batches, device, "texts", lambda m, b: m.encode_text(b["text_ids"], b["text_mask"]), "index"
    )


def evaluate_features(
    image_feats: torch.Tensor,
    image_pids: torch.Tensor | np.ndarray | Sequence[int],
    text_feats: torch.Tensor,
    text_pids: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    return_topk: int = 0,
    i2t: bool = False,
    image_ids: torch.Tensor | Sequence | None = None,
    text_ids: torch.Tensor | Sequence | None = None,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Metrics from already computed features (cosine similarity, exact ranks).

    Args:
        image_feats: (G, D) gallery image features.
        image_pids: (G,) their person ids.
        text_feats: (Q, D) caption features.
        text_pids: (Q,) their person ids.
        ks: cut-offs for R@K.
        return_topk: keep the top ``return_topk`` gallery indices per query (0: none).
        i2t: also compute image-to-text metrics (images as queries, captions as gallery).
        image_ids: (G,) image ids; repeated ids are dropped (first kept), and must agree on pid.
        text_ids: (Q,) caption ids (row index); repeated ids are dropped likewise.
        chunk_size: queries scored at once.
        device: where to score; default CUDA when available.

    Returns:
        An :class:`EvalResult`.
    """
    image_pids = torch.as_tensor(image_pids).cpu()
    text_pids = torch.as_tensor(text_pids).cpu()
    image_feats, image_pids, image_ids = _dedupe(image_feats, image_pids, image_ids, "image")
    text_feats, text_pids, text_ids = _dedupe(text_feats, text_pids, text_ids, "caption")

    t2i = rank_gallery_from_features(
        text_feats,
        image_feats,
        text_pids,
        image_pids,
        chunk_size=chunk_size,
        device=device,
        return_topk=return_topk,
    )
    metrics = t2i.metrics(ks)
    metrics["num_gallery"] = float(t2i.num_gallery)
    i2t_ranks = None
    if i2t:
        i2t_ranks = rank_gallery_from_features(
            image_feats,
            text_feats,
            image_pids,
            text_pids,
            chunk_size=chunk_size,
            device=device,
            return_topk=return_topk,
        )
        metrics.update({f"i2t_{k}": v for k, v in i2t_ranks.metrics(ks).items()})
        metrics["i2t_num_gallery"] = float(i2t_ranks.num_gallery)
    return EvalResult(metrics, t2i, i2t_ranks, image_ids, text_ids, image_pids, text_pids)


def evaluate(
    model: nn.Module,
    image_batches: Iterable[Mapping[str, Any]],
    text_batches: Iterable[Mapping[str, Any]],
    device: torch.device | str | None = None,
    ks: Sequence[int] = (1, 5, 10),
    return_topk: int = 0,
    i2t: bool = False,
    chunk_size: int = 2048,
) -> EvalResult:
    """Encode a split's gallery images and query captions, then rank (text-to-image).

    Args:
        model: module with ``encode_image`` and ``encode_text`` (see ``tpr_core.models``);
            its train/eval mode is restored afterwards.
        image_batches: gallery image batches (see :func:`encode_images`), one per image.
        text_batches: caption batches (see :func:`encode_texts`).
        device: where to encode and score; default: the model's device.
        ks: cut-offs for R@K.
        return_topk: keep the top ``return_topk`` gallery indices per query (0: none).
        i2t: also compute image-to-text metrics.
        chunk_size: queries scored at once.

    Returns:
        An :class:`EvalResult`; ``metrics`` holds ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``.
    """
    images = encode_images(model, image_batches, device)
    texts = encode_texts(model, text_batches, device)
    return evaluate_features(
        images.feats,
        images.pids,
        texts.feats,
        texts.pids,
        ks=ks,
        return_topk=return_topk,
        i2t=i2t,
        image_ids=images.ids,
        text_ids=texts.ids,
        chunk_size=chunk_size,
        device=images.feats.device,
    )


# --------------------------------------------------------------------------- internals


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _encode(model, batches, device, what: str, forward, id_key: str) -> Encoded:
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    feats, pids, ids = [], [], []
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if "pids" not in batch:
                    raise KeyError(f"{what} batch {i} has no 'pids' field (keys: {sorted(batch)})")
                moved = {
                    k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
                }
                out = forward(model, moved)
                if out.dim() != 2 or out.shape[0] != len(batch["pids"]):
                    raise ValueError(
                        f"{what} batch {i}: encoder returned shape {tuple(out.shape)}, "
                        f"expected ({len(batch['pids'])}, D)"
                    )
                feats.append(out.float())  # autocast may hand back half precision
                pids.append(torch.as_tensor(batch["pids"]).reshape(-1).cpu())
                ids.append(batch.get(id_key))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"no {what} batches to encode")
    return Encoded(torch.cat(feats), torch.cat(pids).to(torch.int64), _concat_ids(ids, what, id_key))


def _concat_ids(ids: list, what: str, id_key: str) -> torch.Tensor | list | None:
    present = [x is not None for x in ids]
    if not any(present):
        return None
    if not all(present):
        missing = present.index(False)
        raise ValueError(f"{what} batch {missing} has no '{id_key}' field while other batches do")
    if all(torch.is_tensor(x) for x in ids):
        return torch.cat([x.reshape(-1).cpu() for x in ids])
    out: list = []
    for x in ids:
        out.extend(x.reshape(-1).tolist() if torch.is_tensor(x) else list(x))
    return out


def _dedupe(feats: torch.Tensor, pids: torch.Tensor, ids, what: str):
    """Drop rows whose id was seen before (first occurrence wins); repeated ids must share a pid."""
    if ids is None:
        return feats, pids, None
    id_list = ids.tolist() if torch.is_tensor(ids) else list(ids)
    if len(id_list) != feats.shape[0] or pids.numel() != feats.shape[0]:
        raise ValueError(
            f"{what} ids ({len(id_list)}), pids ({pids.numel()}) and features ({feats.shape[0]}) differ in length"
        )
    first: dict = {}
    keep: list[int] = []
    pid_list = pids.tolist()
    for row, key in enumerate(id_list):
        seen = first.get(key)
        if seen is None:
            first[key] = row
            keep.append(row)
        elif pid_list[seen] != pid_list[row]:
            raise ValueError(
                f"{what} id {key!r} appears with pid {pid_list[seen]} (row {seen}) and pid {pid_list[row]} (row {row})"
            )
    if len(keep) == len(id_list):
        return feats, pids, ids
    idx = torch.tensor(keep, dtype=torch.int64)
    kept_ids = ids[idx] if torch.is_tensor(ids) else [id_list[i] for i in keep]
    return feats[idx.to(feats.device)], pids[idx], kept_ids
