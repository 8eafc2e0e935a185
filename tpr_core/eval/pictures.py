"""Pictures of retrieval results: a grid of ranked galleries and a Recall@K (CMC) curve.

Both are written as PNG files; the training and registry code log them to MLflow.
The grid is drawn with PIL alone; the curve uses matplotlib's Agg canvas directly (no
pyplot, so no global figure state and no backend switching).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tpr_core.eval.metrics import QueryRanks

__all__ = [
    "MATCH_COLOR",
    "MISMATCH_COLOR",
    "choose_queries",
    "recall_curve",
    "retrieval_grid",
    "retrieval_grid_from_ranks",
]

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, bytes, bytearray, memoryview]  # noqa: UP007

MATCH_COLOR = (0, 170, 0)
"""RGB frame colour of a gallery image of the query's person."""
MISMATCH_COLOR = (220, 0, 0)
"""RGB frame colour of a gallery image of another person."""

_BACKGROUND = (255, 255, 255)
_TEXT_COLOR = (0, 0, 0)


def choose_queries(num_queries: int, n: int, seed: int = 0) -> list[int]:
    """Pick ``min(n, num_queries)`` distinct query indices, the same ones for the same arguments.

    Args:
        num_queries: size of the query set.
        n: how many to pick.
        seed: seed of the choice (numpy's PCG64, stable across platforms and versions).

    Returns:
        Sorted query indices.
    """
    if num_queries < 0 or n < 0:
        raise ValueError(f"num_queries and n must be >= 0, got {num_queries} and {n}")
    rng = np.random.Generator(np.random.PCG64(seed))
    picked = rng.choice(num_queries, size=min(n, num_queries), replace=False)
    return sorted(int(i) for i in picked)


def retrieval_grid(
    captions: Sequence[str],
    topk_images: Sequence[Sequence[ImageLike]],
    topk_match: Sequence[Sequence[bool]] | np.ndarray | torch.Tensor,
    out_path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    thumb_size: tuple[int, int] = (64, 128),
    frame: int = 4,
    gap: int = 4,
    margin: int = 8,
    font_size: int = 12,
) -> Path:
    """Draw one row per query: its caption (wrapped), then its ranked gallery images, framed.

    Each gallery image is framed green (:data:`MATCH_COLOR`, same person as the query) or
    red (:data:`MISMATCH_COLOR`).

    Args:
        captions: N query captions.
        topk_images: N lists of K images, best first: PIL images, uint8 arrays (H, W, 3),
            (H, W) or (3, H, W), or encoded image bytes (JPEG/PNG as stored in Parquet).
        topk_match: (N, K) whether each image shows the query's person.
        out_path: PNG file to write (parent folders are created).
        labels: optional N short labels written before each caption (e.g. query index).
        thumb_size: (width, height) of each thumbnail in pixels.
        frame: frame width in pixels.
        gap: space between thumbnails in pixels.
        margin: outer margin in pixels.
        font_size: caption font size in pixels.

    Returns:
        The path written.
    """
    n = len(captions)
    match = np.asarray(topk_match.cpu() if torch.is_tensor(topk_match) else topk_match, dtype=bool)
    if match.ndim != 2:
        raise ValueError(f"topk_match must be (N, K), got shape {match.shape}")
    if len(topk_images) != n or match.shape[0] != n or (labels is not None and len(labels) != n):
        raise ValueError(
            f"captions ({n}), topk_images ({len(topk_images)}), topk_match ({match.shape[0]})"
            + (f" and labels ({len(labels)})" if labels is not None else "")
            + " must have one entry per query"
        )
    if n == 0:
        raise ValueError("retrieval_grid needs at least one query")
    k = match.shape[1]
    for i, row in enumerate(topk_images):
        if len(row) != k:
            raise ValueError(f"query {i}: {len(row)} images but topk_match has {k} columns")
    tw, th = thumb_size
    cell_w, cell_h = tw + 2 * frame, th + 2 * frame
    row_w = k * cell_w + (k - 1) * gap
    font = _font(font_size)
    line_h = int(font_size * 1.3) + 1

    blocks = []
    for i, caption in enumerate(captions):
        text = f"{labels[i]}  {caption}" if labels is not None else caption
        blocks.append(_wrap(text, font, row_w))
    height = margin + sum(len(lines) * line_h + 2 + cell_h + 2 * margin for lines in blocks)
    canvas = Image.new("RGB", (row_w + 2 * margin, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = margin
    for i, lines in enumerate(blocks):
        for line in lines:
            draw.text((margin, y), line, fill=_TEXT_COLOR, font=font)
            y += line_h
        y += 2
        for j in range(k):
            x = margin + j * (cell_w + gap)
            color = MATCH_COLOR if match[i, j] else MISMATCH_COLOR
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=color)
            thumb = _to_pil(topk_images[i][j], f"query {i}, rank {j + 1}").resize((tw, th), Image.BILINEAR)
            canvas.paste(thumb, (x + frame, y + frame))
        y += cell_h + 2 * margin
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


def retrieval_grid_from_ranks(
    ranks: QueryRanks,
    captions: Sequence[str],
    gallery_images: Sequence[ImageLike] | Callable[[int], ImageLike],
    out_path: str | Path,
    *,
    queries: Sequence[int] | None = None,
    n: int = 8,
    k: int = 10,
    seed: int = 0,
    **grid_kwargs,
) -> Path:
    """:func:`retrieval_grid` for chosen queries of an evaluation.

    Args:
        ranks: ranks with top-k lists (``return_topk >= k`` when ranking).
        captions: the caption of every query, in query order.
        gallery_images: gallery images in gallery order, or a function index -> image.
        out_path: PNG file to write.
        queries: query indices to draw; default ``choose_queries(Q, n, seed)``.
        n: number of queries when ``queries`` is not given.
        k: images per query.
        seed: seed of the query choice.
        **grid_kwargs: passed to :func:`retrieval_grid`.

    Returns:
        The path written.
    """
    if ranks.topk_indices is None or ranks.topk_match is None or ranks.topk_indices.shape[1] < k:
        have = 0 if ranks.topk_indices is None else ranks.topk_indices.shape[1]
        raise ValueError(f"ranks hold top-{have} lists, {k} needed: rank with return_topk >= {k}")
    num_q = ranks.topk_indices.shape[0]
    if len(captions) != num_q:
        raise ValueError(f"{len(captions)} captions for {num_q} queries")
    chosen = list(queries) if queries is not None else choose_queries(num_q, n, seed)
    fetch = gallery_images if callable(gallery_images) else gallery_images.__getitem__
    images = [[fetch(int(g)) for g in ranks.topk_indices[q, :k]] for q in chosen]
    return retrieval_grid(
        [captions[q] for q in chosen],
        images,
        ranks.topk_match[chosen, :k].numpy(),
        out_path,
        labels=[f"#{q}" for q in chosen],
        **grid_kwargs,
    )


def recall_curve(
    ranks_or_cmc: QueryRanks
    | Sequence[float]
    | np.ndarray
    | Mapping[str, QueryRanks | Sequence[float] | np.ndarray],
    out_path: str | Path,
    ks: Sequence[int] = range(1, 51),
    title: str = "Recall@K (CMC)",
) -> Path:
    """Plot Recall@K against K (the CMC curve) as a PNG.

    Args:
        ranks_or_cmc: a :class:`QueryRanks`, a CMC array in percent (element ``k-1`` is
            R@k), or a mapping label -> either of those for several curves on one plot.
        out_path: PNG file to write (parent folders are created).
        ks: the K values to plot.
        title: plot title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    curves = ranks_or_cmc if isinstance(ranks_or_cmc, Mapping) else {"": ranks_or_cmc}
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        cmc = curve.cmc(max(ks)) if isinstance(curve, QueryRanks) else np.asarray(curve, dtype=np.float64)
        if cmc.ndim != 1 or cmc.shape[0] < max(ks):
            raise ValueError(f"curve {label!r}: CMC of shape {cmc.shape} does not reach K={max(ks)}")
        values = cmc[np.asarray(ks) - 1]
        r1 = f"R@1 {cmc[0]:.1f}"
        ax.plot(
            ks, values, marker="o" if len(ks) <= 20 else None, linewidth=1.8, label=f"{label} ({r1})".strip()
        )
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 102)  # headroom so a curve at 100 stays visible above the frame
    ax.set_xlim(min(ks), max(ks))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------- internals


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (words longer than a line get a line of their own)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def _to_pil(image: ImageLike, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes | bytearray | memoryview):
        try:
            return Image.open(io.BytesIO(bytes(image))).convert("RGB")
        except OSError as err:
            raise ValueError(f"{where}: image bytes could not be decoded ({err})") from err
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"{where}: image array must be (H, W), (H, W, 3) or (3, H, W), got {arr.shape}")
    return Image.fromarray(arr).convert("RGB")
