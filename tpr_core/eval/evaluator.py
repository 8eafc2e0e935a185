"""Evaluate a retrieval model on one split: encode the gallery and the queries, then rank.

One path encodes: :func:`encode_dataset` runs an :class:`Encoder` (a plain module's
``encode_image``/``encode_text``, or any ``forward(batch, side)`` such as a DeepSpeed
engine) over a dataset, or over one rank's equal share of it, and reassembles the
features of every rank through a ``gather`` callable (one process: :func:`gather_local`;
the training workers pass an all-gather across ranks). :func:`encode_split` does so for a
split's gallery and queries, :func:`evaluate_split` ranks them in one process, and
:func:`evaluate_features` turns features into metrics. :func:`evaluate` encodes
ready-made batches instead of a split.

Gallery images come from a table with one row per (image, caption), and samplers may pad
a split to divide evenly among workers, so both sides can hold repeated rows. When ids are
given (``image_ids`` in image batches, ``index`` in text batches) repeats are dropped,
keeping the first occurrence, so each image and each caption counts once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from tpr_core.eval.metrics import QueryRanks, rank_gallery_from_features
from tpr_core.progress import Progress

Forward = Callable[[dict[str, torch.Tensor], str], torch.Tensor]
"""``forward(batch, side)``: (B, D) features of a batch on the encoding device; ``side`` is
``"image"`` (the batch holds ``images``) or ``"text"`` (``text_ids``, ``text_mask``)."""

Gather = Callable[[Any], list[Any]]
"""``gather(obj)``: every rank's ``obj``, in rank order (all ranks call it together)."""

# side -> (what a message calls its batches, the batch field that identifies a row)
_SIDES = {"image": ("images", "image_ids"), "text": ("texts", "index")}


@dataclass(frozen=True)
class Encoder:
    """What encodes a batch.

    Attributes:
        module: put in eval mode while encoding (its train/eval mode is restored afterwards).
        forward: see :data:`Forward`.
        device: where batches go; None: the device of ``module``'s parameters.
    """

    module: nn.Module
    forward: Forward
    device: torch.device | None = None


def module_encoder(model: nn.Module, device: torch.device | str | None = None) -> Encoder:
    """The :class:`Encoder` of a plain module with ``encode_image(images)`` and
    ``encode_text(text_ids, text_mask)`` (see ``tpr_core.models``)."""

    def forward(batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
        if side == "image":
            return model.encode_image(batch["images"])
        return model.encode_text(batch["text_ids"], batch["text_mask"])

    return Encoder(model, forward, torch.device(device) if device is not None else None)


def gather_local(obj: Any) -> list[Any]:
    """The :data:`Gather` of a single process: its own object, alone."""
    return [obj]


class Encoded(NamedTuple):
    """Features of one side of a split, in batch order.

    Attributes:
        feats: (N, D) float32 features, not normalised, on the encoding device (on CPU from
            :func:`encode_dataset`).
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
    return _encode(module_encoder(model, device), batches, "image")


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
    return _encode(module_encoder(model, device), batches, "text")


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
    return rank_encoded(
        images, texts, ks=ks, return_topk=return_topk, i2t=i2t, chunk_size=chunk_size, device=images.feats.device
    )


def rank_encoded(
    images: Encoded, texts: Encoded, device: torch.device | str | None = None, **kwargs: Any
) -> EvalResult:
    """:func:`evaluate_features` of encoded gallery images and queries (their ids included);
    ``kwargs`` are :func:`evaluate_features`'s ``ks``, ``return_topk``, ``i2t``, ``chunk_size``."""
    return evaluate_features(
        images.feats, images.pids, texts.feats, texts.pids,
        image_ids=images.ids, text_ids=texts.ids, device=device, **kwargs,
    )


# --------------------------------------------------------------------------- a split


def shard_positions(n: int, rank: int, world: int) -> list[int]:
    """Positions of ``range(n)`` that ``rank`` of ``world`` encodes: every ``world``-th from
    ``rank``, ceil(n / world) of them on every rank (the last position repeated as padding),
    so that all ranks run the same number of forwards (ZeRO-3 gathers weights collectively)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    per = math.ceil(n / world)
    return [min(i * world + rank, n - 1) for i in range(per)]


def encode_dataset(
    encoder: Encoder,
    dataset: Any,
    side: str,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    gather: Gather = gather_local,
    progress: Progress | None = None,
) -> Encoded:
    """Encode every item of ``dataset``, in dataset order; features on CPU.

    With ``world > 1`` this rank encodes its share (:func:`shard_positions`) and ``gather``
    brings every rank's share; rows are put back in dataset order (padding dropped).

    Args:
        encoder: what encodes (:func:`module_encoder` for a plain module).
        dataset: map-style dataset of item dicts (``GalleryDataset``, ``QueryDataset``),
            batched with ``tpr_core.data.dataset.collate``.
        side: ``"image"`` or ``"text"`` (see :data:`Forward`).
        batch_size: items per forward.
        rank, world: this rank and the number of ranks.
        gather: see :data:`Gather`; all ranks must call this function together.
        progress: counts this rank's encoded items, if given.

    Returns:
        (N, D) float32 features, (N,) pids and the rows' ids, N = ``len(dataset)``.
    """
    from torch.utils.data import DataLoader, Subset

    from tpr_core.data.dataset import collate

    n = len(dataset)
    positions = shard_positions(n, rank, world)
    share = dataset if world == 1 else Subset(dataset, positions)
    loader = DataLoader(share, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    enc = _encode(encoder, loader, side, progress)
    parts = gather((enc.feats.cpu(), enc.pids, enc.ids, positions))
    return _assemble(parts, n)


def encode_split(
    encoder: Encoder,
    split_data: Any,
    tokenizer: Any,
    image_size: Sequence[int],
    text_length: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    gather: Gather = gather_local,
    progress: str | None = None,
) -> tuple[Encoded, Encoded]:
    """Encode a split's gallery (its unique images) and queries (every caption) with
    :func:`encode_dataset`; returns (images, texts), each in split order.

    Args:
        encoder: what encodes.
        split_data: a ``tpr_core.data.dataset.SplitData``.
        tokenizer: the model's ``tpr_core.data.tokenizer.Tokenizer``.
        image_size: (H, W) the model takes.
        text_length: caption tokens the model takes.
        batch_size, rank, world, gather: see :func:`encode_dataset`.
        progress: label of one :class:`~tpr_core.progress.Progress` over images and captions
            (None: no display).
    """
    from tpr_core.data.dataset import GalleryDataset, QueryDataset

    gallery = GalleryDataset(split_data, (int(image_size[0]), int(image_size[1])))
    queries = QueryDataset(split_data, tokenizer, text_length)
    share = len(shard_positions(len(gallery), rank, world)) + len(shard_positions(len(queries), rank, world))
    with Progress(progress or "", share, "images + captions", show=None if progress else False) as p:
        images = encode_dataset(encoder, gallery, "image", batch_size, rank, world, gather, p)
        texts = encode_dataset(encoder, queries, "text", batch_size, rank, world, gather, p)
    return images, texts


def evaluate_split(
    model: nn.Module,
    split_data: Any,
    tokenizer: Any,
    image_size: Sequence[int],
    text_length: int,
    batch_size: int,
    device: torch.device | str | None = None,
    return_topk: int = 0,
    progress: str | None = None,
) -> EvalResult:
    """Encode a split with a plain module in this process (:func:`encode_split`, with its
    ``progress`` label), then rank text-to-image on ``device`` (default: the model's device).

    Returns:
        An :class:`EvalResult`; ``metrics`` holds ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``.
    """
    encoder = module_encoder(model, device)
    images, texts = encode_split(
        encoder, split_data, tokenizer, image_size, text_length, batch_size, progress=progress
    )
    return rank_encoded(images, texts, return_topk=return_topk, device=_device_of(encoder))


# --------------------------------------------------------------------------- internals


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _device_of(encoder: Encoder) -> torch.device:
    return encoder.device if encoder.device is not None else _model_device(encoder.module)


def _encode(
    encoder: Encoder, batches: Iterable[Mapping[str, Any]], side: str, progress: Progress | None = None
) -> Encoded:
    what, id_key = _SIDES[side]
    dev = _device_of(encoder)
    model = encoder.module
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
                out = encoder.forward(moved, side)
                if out.dim() != 2 or out.shape[0] != len(batch["pids"]):
                    raise ValueError(
                        f"{what} batch {i}: encoder returned shape {tuple(out.shape)}, "
                        f"expected ({len(batch['pids'])}, D)"
                    )
                feats.append(out.float())  # autocast may hand back half precision
                pids.append(torch.as_tensor(batch["pids"]).reshape(-1).cpu())
                ids.append(batch.get(id_key))
                if progress is not None:
                    progress.advance(len(batch["pids"]))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"no {what} batches to encode")
    return Encoded(torch.cat(feats), torch.cat(pids).to(torch.int64), _concat_ids(ids, what, id_key))


def _assemble(parts: list[tuple[torch.Tensor, torch.Tensor, Any, list[int]]], n: int) -> Encoded:
    """Every rank's (features, pids, ids, positions) -> one :class:`Encoded` in position order.

    Rows are written rank after rank, so a repeated (padding) position keeps the row written
    last for it."""
    feats = torch.zeros(n, parts[0][0].shape[1])
    pids = torch.zeros(n, dtype=torch.int64)
    first_ids = parts[0][2]
    ids: Any = None
    if torch.is_tensor(first_ids):
        ids = torch.zeros(n, dtype=first_ids.dtype)
    elif first_ids is not None:
        ids = [None] * n
    for f, p, i, positions in parts:
        at = torch.as_tensor(positions, dtype=torch.int64)
        feats[at] = f
        pids[at] = p
        if isinstance(ids, list):
            for pos, key in zip(positions, i, strict=True):
                ids[pos] = key
        elif ids is not None:
            ids[at] = i
    return Encoded(feats, pids, ids)


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
