"""Retrieval pictures: frames where the matches are, PNG sizes, deterministic query choice."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tpr_core.eval import (
    MATCH_COLOR,
    MISMATCH_COLOR,
    choose_queries,
    rank_gallery,
    recall_curve,
    retrieval_grid,
    retrieval_grid_from_ranks,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def solid(colour, size=(40, 90)) -> np.ndarray:
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = colour
    return arr


def jpeg_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(solid(colour)).save(buf, format="JPEG")
    return buf.getvalue()


def frame_runs(img: Image.Image, x: int) -> list[tuple[int, int, int]]:
    """Colours of the vertical runs of frame-coloured pixels down column x, top to bottom."""
    column = np.asarray(img)[:, x, :]
    runs, prev = [], None
    for px in map(tuple, column):
        colour = px if px in (MATCH_COLOR, MISMATCH_COLOR) else None
        if colour is not None and colour != prev:
            runs.append(colour)
        prev = colour
    return runs


def test_grid_frames_mark_matches(tmp_path):
    k, frame, gap, margin, thumb = 10, 4, 4, 8, (32, 64)
    match = np.array(
        [
            [True, False, False, True, False, False, False, False, False, True],
            [False] * 10,
            [True] * 10,
        ]
    )
    greys = [(90 + 10 * j, 90 + 10 * j, 90 + 10 * j) for j in range(k)]
    images = [
        [solid(c) for c in greys],  # arrays
        [jpeg_bytes(c) for c in greys],  # encoded bytes, as stored in Parquet
        [Image.fromarray(solid(c)) for c in greys],  # PIL images
    ]
    captions = [
        "a woman in a red coat with a black backpack " * 4,  # wraps over several lines
        "a man in blue jeans",
        "short",
    ]
    out = retrieval_grid(
        captions,
        images,
        match,
        tmp_path / "sub" / "grid.png",
        thumb_size=thumb,
        frame=frame,
        gap=gap,
        margin=margin,
    )
    assert out.read_bytes()[:8] == PNG_MAGIC
    img = Image.open(out).convert("RGB")
    cell_w, cell_h = thumb[0] + 2 * frame, thumb[1] + 2 * frame
    assert img.width == 2 * margin + k * cell_w + (k - 1) * gap
    assert 3 * cell_h < img.height < 3 * (cell_h + 2 * margin) + 200
    arr = np.asarray(img)
    for j in range(k):
        left = margin + j * (cell_w + gap)
        # Down the left frame strip of column j: one run per query, coloured by match.
        want = [MATCH_COLOR if match[i, j] else MISMATCH_COLOR for i in range(3)]
        assert frame_runs(img, left + 1) == want, j
        # The thumbnail itself sits inside the frame, its grey intact (JPEG: nearly).
        ys = [y for y in range(img.height) if tuple(arr[y, left + 1]) in (MATCH_COLOR, MISMATCH_COLOR)]
        centre = arr[ys[0] + cell_h // 2, left + cell_w // 2].astype(int)
        assert np.abs(centre - np.array(greys[j])).max() <= 3


def test_grid_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="one entry per query"):
        retrieval_grid(["a", "b"], [[solid((0, 0, 0))]], np.array([[True]]), tmp_path / "g.png")
    with pytest.raises(ValueError, match="query 0: 2 images"):
        retrieval_grid(["a"], [[solid((0, 0, 0))] * 2], np.array([[True]]), tmp_path / "g.png")
    with pytest.raises(ValueError, match="query 0, rank 1: image bytes could not be decoded"):
        retrieval_grid(["a"], [[b"not an image"]], np.array([[True]]), tmp_path / "g.png")
    with pytest.raises(ValueError, match="uint8"):
        retrieval_grid(["a"], [[np.zeros((4, 4, 3), np.float32)]], np.array([[True]]), tmp_path / "g.png")


def test_choose_queries_is_deterministic():
    a = choose_queries(1000, 8, seed=0)
    assert a == choose_queries(1000, 8, seed=0)
    assert len(set(a)) == 8 and a == sorted(a) and all(0 <= i < 1000 for i in a)
    assert a != choose_queries(1000, 8, seed=1)
    assert choose_queries(5, 8) == [0, 1, 2, 3, 4]
    assert choose_queries(0, 3) == []


def test_grid_from_ranks_uses_topk_lists(tmp_path):
    gen = torch.Generator().manual_seed(0)
    gallery_pids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 6])
    query_pids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1, 3])
    sim = torch.randn(len(query_pids), len(gallery_pids), generator=gen)
    ranks = rank_gallery(sim, query_pids, gallery_pids, return_topk=10)
    gallery = [solid((10 * g, 100, 100)) for g in range(len(gallery_pids))]
    captions = [f"caption {i}" for i in range(len(query_pids))]
    queries = choose_queries(len(query_pids), 3, seed=0)
    out = retrieval_grid_from_ranks(ranks, captions, gallery, tmp_path / "g.png", n=3, thumb_size=(20, 40))
    img = Image.open(out).convert("RGB")
    cell_w = 20 + 8
    for j in range(10):
        want = [MATCH_COLOR if ranks.topk_match[q, j] else MISMATCH_COLOR for q in queries]
        assert frame_runs(img, 8 + j * (cell_w + 4) + 1) == want
    with pytest.raises(ValueError, match="return_topk >= 10"):
        retrieval_grid_from_ranks(
            rank_gallery(sim, query_pids, gallery_pids), captions, gallery, tmp_path / "x.png"
        )


def _pixels_near(img: Image.Image, rgb, tol: int = 30) -> int:
    arr = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).max(axis=2) <= tol).sum())


def test_recall_curve_png(tmp_path):
    sim = torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
    ranks = rank_gallery(sim, torch.arange(30) % 6, torch.arange(12) % 6)
    out = recall_curve(ranks, tmp_path / "cmc.png", ks=range(1, 13))
    assert out.read_bytes()[:8] == PNG_MAGIC
    img = Image.open(out)
    assert img.size == (600, 400)
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colours
    assert _pixels_near(img, blue) > 200 and _pixels_near(img, orange) == 0
    two = recall_curve({"t2i": ranks, "i2t": np.linspace(10, 100, 50)}, tmp_path / "two.png", ks=range(1, 51))
    assert _pixels_near(Image.open(two), orange) > 200
    with pytest.raises(ValueError, match="does not reach K=60"):
        recall_curve(np.linspace(0, 100, 50), tmp_path / "bad.png", ks=range(1, 61))
