"""Exact retrieval metrics (R@K, mAP, mINP) without ever holding the full similarity matrix.

Protocol (text-to-image person retrieval, as the TPR papers report it): every caption of
the split is a query, every image of the split is in the gallery, and a gallery item
*matches* a query when their person ids are equal (any image of the person counts, not
only the caption's own image). All metrics are percentages.

- ``R@K``: share of queries with at least one match among the first K gallery items.
- ``AP`` of a query: mean over its matches of the precision at that match's rank,
  ``(1/m) * sum_l l / rank_l`` with ``rank_1 < ... < rank_m`` the 1-based ranks of its
  ``m`` matches. ``mAP`` is the mean over queries.
- ``INP`` of a query: ``m / rank_m`` (how much of the list must be read to find the last
  match). ``mINP`` is the mean over queries.

Ranking order (documented, exact): gallery items are ordered by score, highest first;
items with *equal* scores are ordered by gallery index, lower index first (what a stable
sort on ``-score`` gives). Scores are compared as float32 (float16 / bfloat16 inputs
convert exactly; float64 similarities are rounded to float32 first), and ``-0.0`` equals
``0.0``.

Queries without any match in the gallery are left out of every metric (they have no
defined rank); the returned dict says how many there were (``num_queries`` vs
``num_valid_queries``).

How the chunked path stays exact and cheap: a match's rank is 1 + the number of items
scoring strictly higher + the number of items with the same score and a lower index. Only
items scoring at least a row's lowest match can count, so only those *candidates* are
sorted, by value only (no indices), and two binary searches per match give the first count
and reveal whether the match's score is shared; only those rare tied pairs are counted
directly. On CPU each row's candidates are selected and sorted on their own (numpy's
vectorised sort), on tpr's threads, which also score their rows with numpy's BLAS, one BLAS
thread each; on GPU all rows' candidates are sorted at once by a packed (row, score) key,
or whole rows with ``torch.sort`` when candidates are most of the block. Top-k lists, when
asked for, come from the few items scoring at least the k-th best, sorted by (score desc,
index asc).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

__all__ = [
    "QueryRanks",
    "cmc_curve",
    "rank_gallery",
    "rank_gallery_from_features",
    "retrieval_metrics",
    "retrieval_metrics_from_features",
]

# The metrics every report, gate and table shows, in this order (percent).
REPORTED_METRICS: tuple[str, ...] = ("R1", "R5", "R10", "mAP", "mINP")


@dataclass(frozen=True)
class QueryRanks:
    """Where each query's matches landed in its ranked gallery.

    Attributes:
        match_ranks: (Q, M) long, the 1-based ranks of the query's matches in increasing
            order, padded with 0; M is the largest number of gallery items sharing a pid.
        num_matches: (Q,) long, number of gallery items matching each query (0: no match).
        num_gallery: gallery size G.
        topk_indices: (Q, k) long gallery indices of the top k items, best first, or None.
        topk_match: (Q, k) bool, whether each of those items matches the query, or None.
    """

    match_ranks: torch.Tensor
    num_matches: torch.Tensor
    num_gallery: int
    topk_indices: torch.Tensor | None = None
    topk_match: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """(Q,) bool: queries with at least one match (the ones the metrics average over)."""
        return self.num_matches > 0

    @property
    def first_match_rank(self) -> torch.Tensor:
        """(Q,) long: rank of the best-ranked match, 0 for queries without a match."""
        return self.match_ranks[:, 0]

    def average_precision(self) -> torch.Tensor:
        """(Q,) float64 AP per query (fraction, not percent); NaN for queries without a match."""
        ranks = self.match_ranks.to(torch.float64)  # (Q, M)
        ordinal = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)  # (M,)
        # Padding ranks are 0; divide by 1 there and mask the term out.
        precision = torch.where(ranks > 0, ordinal / ranks.clamp(min=1), torch.zeros_like(ranks))
        ap = precision.sum(dim=1) / self.num_matches.to(torch.float64)
        return torch.where(self.valid, ap, torch.full_like(ap, float("nan")))

    def inverse_negative_penalty(self) -> torch.Tensor:
        """(Q,) float64 INP per query (fraction): matches / rank of the last match; NaN without match."""
        m = self.num_matches
        last = self.match_ranks.gather(1, (m - 1).clamp(min=0)[:, None])[:, 0]  # (Q,)
        inp = m.to(torch.float64) / last.clamp(min=1).to(torch.float64)
        return torch.where(self.valid, inp, torch.full_like(inp, float("nan")))

    def metrics(self, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
        """Summary metrics in percent: ``R{k}`` per k, ``mAP``, ``mINP``, plus query counts.

        Raises:
            ValueError: if no query has a match in the gallery.
        """
        valid = self.valid
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise ValueError(
                f"no query has a matching pid in the gallery ({self.num_matches.numel()} queries, "
                f"{self.num_gallery} gallery items): metrics are undefined"
            )
        first = self.first_match_rank[valid]
        out: dict[str, float] = {}
        for k in _check_ks(ks):
            out[f"R{k}"] = 100.0 * float((first <= k).to(torch.float64).mean())
        out["mAP"] = 100.0 * float(self.average_precision()[valid].mean())
        out["mINP"] = 100.0 * float(self.inverse_negative_penalty()[valid].mean())
        out["num_queries"] = float(self.num_matches.numel())
        out["num_valid_queries"] = float(n_valid)
        return out

    def cmc(self, max_k: int = 50) -> np.ndarray:
        """CMC curve in percent: element ``k-1`` is R@k for k = 1..max_k (valid queries only)."""
        return cmc_curve(self, max_k)


def cmc_curve(ranks: QueryRanks, max_k: int = 50) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[k-1]`` = R@k in percent, for k = 1..max_k.

    Args:
        ranks: per-query ranks from :func:`rank_gallery` / :func:`rank_gallery_from_features`.
        max_k: last k of the curve.

    Returns:
        (max_k,) float64 array, non-decreasing.
    """
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    valid = ranks.valid
    if not bool(valid.any()):
        raise ValueError("no query has a matching pid in the gallery: the CMC curve is undefined")
    first = ranks.first_match_rank[valid]
    # Ranks beyond max_k only matter as "not found yet", so fold them into one overflow bin.
    hist = torch.bincount(first.clamp(max=max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return 100.0 * hist.cumsum(0).to(torch.float64).numpy() / first.numel()


def retrieval_metrics(
    similarity: torch.Tensor | np.ndarray,
    query_pids: torch.Tensor | np.ndarray | Sequence[int],
    gallery_pids: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@K, mAP and mINP (percent) from a full (Q, G) similarity matrix.

    For image-to-text retrieval pass images as queries: ``retrieval_metrics(sim.T,
    image_pids, text_pids)``.

    Args:
        similarity: (Q, G) scores, higher is better.
        query_pids: (Q,) integer person ids of the queries.
        gallery_pids: (G,) integer person ids of the gallery items.
        ks: cut-offs for R@K.

    Returns:
        Keys: R{k} for each k, mAP, mINP, num_queries, num_valid_queries.
    """
    return rank_gallery(similarity, query_pids, gallery_pids).metrics(ks)


def retrieval_metrics_from_features(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor | np.ndarray | Sequence[int],
    gallery_pids: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
    normalize: bool = True,
) -> dict[str, float]:
    """Same as :func:`retrieval_metrics` with similarity = query_feats @ gallery_feats.T, in chunks.

    Identical results to the matrix path on the same scores; memory is O(chunk_size x G).

    Args:
        query_feats: (Q, D) query features.
        gallery_feats: (G, D) gallery features.
        query_pids: (Q,) integer person ids.
        gallery_pids: (G,) integer person ids.
        ks: cut-offs for R@K.
        chunk_size: queries scored at once.
        device: where to score; default CUDA when available, else CPU.
        normalize: L2-normalise both feature sets first (cosine similarity).

    Returns:
        Keys: R{k} for each k, mAP, mINP, num_queries, num_valid_queries.
    """
    ranks = rank_gallery_from_features(
        query_feats,
        gallery_feats,
        query_pids,
        gallery_pids,
        chunk_size=chunk_size,
        device=device,
        normalize=normalize,
    )
    return ranks.metrics(ks)


def rank_gallery(
    similarity: torch.Tensor | np.ndarray,
    query_pids: torch.Tensor | np.ndarray | Sequence[int],
    gallery_pids: torch.Tensor | np.ndarray | Sequence[int],
    return_topk: int = 0,
    chunk_size: int = 2048,
) -> QueryRanks:
    """Per-query match ranks (and optionally top-k lists) from a full (Q, G) similarity matrix.

    Args:
        similarity: (Q, G) scores, higher is better; must be finite.
        query_pids: (Q,) integer person ids.
        gallery_pids: (G,) integer person ids.
        return_topk: also return the top ``min(return_topk, G)`` gallery indices per query.
        chunk_size: rows processed at once (bounds the working memory, not the result).
    """
    _check_chunk_size(chunk_size)
    sim = torch.as_tensor(similarity)
    if sim.dim() != 2:
        raise ValueError(f"similarity must be 2-D (queries, gallery), got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise ValueError(f"similarity must be a floating-point tensor, got {sim.dtype}")
    qp, gp = _check_pids(query_pids, gallery_pids, sim.shape[0], sim.shape[1], "similarity")
    ranker = _Ranker(gp.to(sim.device), return_topk)

    def score_rows(start: int, stop: int) -> torch.Tensor:
        block = sim[start:stop].to(torch.float32)  # a view when already float32
        lo, hi = torch.aminmax(block)  # NaN propagates, so this catches NaN and +-inf
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            bad = int((~torch.isfinite(block)).any(dim=1).nonzero()[0, 0]) + start
            raise ValueError(f"similarity row {bad} (query {bad}) holds a non-finite score")
        return block

    # score_rows has checked every block for non-finite scores already.
    return ranker.run(score_rows, qp.to(sim.device), sim.shape[0], chunk_size, check_finite=False)


def rank_gallery_from_features(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor | np.ndarray | Sequence[int],
    gallery_pids: torch.Tensor | np.ndarray | Sequence[int],
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
    normalize: bool = True,
    return_topk: int = 0,
) -> QueryRanks:
    """Per-query match ranks from features, scoring ``chunk_size`` queries against the gallery at a time.

    The full (Q, G) similarity matrix is never built; each chunk's (chunk_size, G) block is
    scored on ``device`` (CUDA when available) and reduced to match ranks there.

    Args:
        query_feats: (Q, D) query features.
        gallery_feats: (G, D) gallery features.
        query_pids: (Q,) integer person ids.
        gallery_pids: (G,) integer person ids.
        chunk_size: queries scored at once.
        device: where to score; default CUDA when available, else CPU.
        normalize: L2-normalise both feature sets first (cosine similarity).
        return_topk: also return the top ``min(return_topk, G)`` gallery indices per query.
    """
    _check_chunk_size(chunk_size)
    q = torch.as_tensor(query_feats)
    g = torch.as_tensor(gallery_feats)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query_feats (Q, D) and gallery_feats (G, D) must be 2-D with the same D, "
            f"got {tuple(q.shape)} and {tuple(g.shape)}"
        )
    for name, t in (("query_feats", q), ("gallery_feats", g)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        finite = torch.isfinite(t).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"{name} row {int((~finite).nonzero()[0, 0])} holds a non-finite value")
    qp, gp = _check_pids(query_pids, gallery_pids, q.shape[0], g.shape[0], "features")
    dev = torch.device(device) if device is not None else _default_device()

    # Normalise once for all chunks, so every chunk sees exactly the same operands.
    g = g.to(dev, torch.float32)
    if normalize:
        g = F.normalize(g, dim=1)
    bounded = _scores_bounded(q, g, normalize)
    gt = g.t()  # (D, G) view; BLAS reads the transpose in place, no copy
    ranker = _Ranker(gp.to(dev), return_topk)

    # One score buffer for all chunks (see _Ranker.run).
    buffer = torch.empty(min(chunk_size, q.shape[0]), g.shape[0], dtype=torch.float32, device=dev)

    # On CPU the product goes through numpy's BLAS (OpenBLAS in the numpy wheels), one BLAS
    # thread per row block on tpr's own threads, which then rank their rows. At ICFG size on
    # a 2-core AMD EPYC (AVX2) numpy scored in 2.4 s where torch.mm (MKL) took 3.9 s; and
    # with BLAS's own threads, each product left a thread spinning for tens of milliseconds
    # afterwards, which nearly halved the speed of the ranking that followed (bench/README.md).
    threads = _RowThreads(torch.get_num_threads() if dev.type == "cpu" else 1)
    cpu_blas = dev.type == "cpu" and CPU_NUMPY_MATMUL
    gt_np = gt.numpy() if cpu_blas else None

    def score_rows(start: int, stop: int) -> torch.Tensor:
        qc = q[start:stop].to(dev, torch.float32)  # (C, D)
        if normalize:
            qc = F.normalize(qc, dim=1)
        out = buffer[: stop - start]
        if not cpu_blas:
            return torch.mm(qc, gt, out=out)  # (C, G)
        q_np, out_np = qc.numpy(), out.numpy()

        def score_block(rows: range) -> None:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused afterwards
                np.matmul(q_np[rows.start : rows.stop], gt_np, out=out_np[rows.start : rows.stop])

        threads.map(score_block, stop - start)
        return out

    # threadpool_limits is process-wide: BLAS calls elsewhere run single-threaded meanwhile.
    limits = (
        threadpool_limits(limits=1, user_api="blas") if cpu_blas and threads.workers > 1 else nullcontext()
    )
    try:
        with limits:
            return ranker.run(
                score_rows, qp.to(dev), q.shape[0], chunk_size, check_finite=not bounded, threads=threads
            )
    finally:
        threads.close()


# --------------------------------------------------------------------------- internals


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_chunk_size(chunk_size: int) -> None:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _as_pids(pids: torch.Tensor | np.ndarray | Sequence[int], name: str) -> torch.Tensor:
    t = torch.as_tensor(pids)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer person ids, got {t.dtype}")
    return t.to(torch.int64)


def _check_pids(
    query_pids, gallery_pids, num_q: int, num_g: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    qp = _as_pids(query_pids, "query_pids")
    gp = _as_pids(gallery_pids, "gallery_pids")
    if qp.numel() != num_q or gp.numel() != num_g:
        raise ValueError(
            f"pid counts ({qp.numel()} queries, {gp.numel()} gallery) do not match the {source} "
            f"({num_q} queries, {num_g} gallery)"
        )
    if num_q == 0 or num_g == 0:
        raise ValueError(f"empty retrieval problem: {num_q} queries, {num_g} gallery items")
    return qp, gp


def _scores_bounded(q: torch.Tensor, g: torch.Tensor, normalized: bool) -> bool:
    """True when the float32 scores ``q @ g.T`` cannot hold inf or NaN (no finiteness check needed).

    ``q`` is the raw query features (converted to float32 chunk by chunk), ``g`` the float32
    gallery as scored. Finite float32 operands give finite products unless a sum overflows;
    by Cauchy-Schwarz every partial sum is at most about ``|q_i| |g_j|`` (a factor 2 covers
    rounding), checked against float32's largest value; unit vectors always pass.
    """
    q32 = q.to(torch.float32)  # float64 features beyond float32's range become inf here
    if not (bool(torch.isfinite(q32).all()) and bool(torch.isfinite(g).all())):
        return False
    if normalized:
        return True
    bound = (
        torch.linalg.vector_norm(q32, dim=1, dtype=torch.float64).max()
        * torch.linalg.vector_norm(g, dim=1, dtype=torch.float64).max()
    )
    return bool(torch.isfinite(bound)) and float(bound) < torch.finfo(torch.float32).max / 2


def _check_finite(scores: torch.Tensor, row_offset: int) -> None:
    bad = ~torch.isfinite(scores).all(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"query {int(bad.nonzero()[0, 0]) + row_offset}: a score is not finite (non-finite "
            "features, or products overflowing float32), ranks are undefined"
        )


def _ascending_key(x: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) that orders float32 values ascending (see :func:`_descending_key`)."""
    return 2**32 - 1 - _descending_key(x)


def _descending_key(x: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) that orders float32 values descending: larger x -> smaller key.

    The float's bit pattern read as int32 is monotone for non-negative floats and reversed
    for negative ones; flipping the magnitude bits of negatives makes it monotone overall.
    Adding 0.0 first turns -0.0 into +0.0 so the two compare equal, like floats do.
    """
    bits = (x + 0.0).view(torch.int32)
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # ascending with x
    return (2**31 - 1) - mono  # ascending with -x, in [0, 2**32)


class _RowThreads:
    """CPU threads that each take one contiguous range of a block's rows (numpy releases the
    GIL in BLAS products, comparisons and sorts, so the ranges run in parallel)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def map(self, fn: Callable[[range], None], num_rows: int) -> None:
        """``fn(rows)`` for each of up to ``workers`` consecutive ranges covering ``range(num_rows)``."""
        step = -(-num_rows // self.workers)
        blocks = [range(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]
        if self._pool is None or len(blocks) == 1:
            for rows in blocks:
                fn(rows)
        else:
            list(self._pool.map(fn, blocks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


# (C, M) gallery indices of each query's matches (0 where padded), their validity, their scores.
Matches = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Above this share of a block's scores as candidates, whole rows are sorted instead (the
# path off the CPU).
CANDIDATE_SHARE = 0.25
# On CPU, rank each row from its own candidates (see _Ranker._match_ranks_per_row).
CPU_ROW_CANDIDATES = True
# On CPU, score feature chunks with numpy's matmul instead of torch.mm (see
# rank_gallery_from_features).
CPU_NUMPY_MATMUL = True


class _Ranker:
    """Turns (C, G) score blocks into match ranks, given the gallery pids."""

    def __init__(self, gallery_pids: torch.Tensor, return_topk: int) -> None:
        if return_topk < 0:
            raise ValueError(f"return_topk must be >= 0, got {return_topk}")
        dev = gallery_pids.device
        self.num_gallery = gallery_pids.numel()
        self.topk = min(int(return_topk), self.num_gallery)
        # Group the gallery by pid: group id per item, and a (P, M) table of each group's items.
        self.group_pids, self.gallery_group = torch.unique(gallery_pids, return_inverse=True)  # (P,), (G,)
        counts = torch.bincount(self.gallery_group, minlength=self.group_pids.numel())  # (P,)
        self.group_size = counts
        self.max_matches = int(counts.max())
        order = torch.argsort(self.gallery_group, stable=True)  # items grouped, index order kept
        starts = counts.cumsum(0) - counts
        slot = torch.arange(self.num_gallery, device=dev) - starts[self.gallery_group[order]]
        self.table = torch.full((counts.numel(), self.max_matches), -1, dtype=torch.int64, device=dev)
        self.table[self.gallery_group[order], slot] = order

    def query_groups(self, query_pids: torch.Tensor) -> torch.Tensor:
        """(Q,) group index of each query's pid, -1 when the gallery holds no such pid."""
        pos = torch.searchsorted(self.group_pids, query_pids).clamp(max=self.group_pids.numel() - 1)
        found = self.group_pids[pos] == query_pids
        return torch.where(found, pos, torch.full_like(pos, -1))

    def run(
        self,
        score_rows,
        query_pids: torch.Tensor,
        num_queries: int,
        chunk_size: int,
        check_finite: bool = True,
        threads: _RowThreads | None = None,
    ) -> QueryRanks:
        """Ranks of every query's matches; ``score_rows(start, stop)`` gives a (C, G) float32 block.
        ``check_finite=False`` when the caller knows the blocks are finite (one pass less per block);
        ``threads``: the CPU row threads to use (default: new ones, one per torch thread)."""
        groups = self.query_groups(query_pids)  # (Q,)
        rows = min(chunk_size, num_queries)
        dev = groups.device
        # Scratch blocks reused across chunks: on CPU a fresh (C, G) block per chunk costs page faults.
        sorted_buf = None  # allocated when a chunk first sorts whole rows
        mask_buf = torch.empty(rows, self.num_gallery, dtype=torch.bool, device=dev) if self.topk else None
        ranks, topk_idx = [], []
        own_threads = threads is None
        if own_threads:
            threads = _RowThreads(torch.get_num_threads() if dev.type == "cpu" else 1)
        try:
            for start in range(0, num_queries, chunk_size):
                stop = min(start + chunk_size, num_queries)
                scores = score_rows(start, stop).detach()  # (C, G) float32
                if check_finite:
                    _check_finite(scores, start)
                matches = self._matches(scores, groups[start:stop])
                if dev.type == "cpu" and CPU_ROW_CANDIDATES:
                    rank = self._match_ranks_per_row(scores, matches, threads)
                else:
                    rank = self._match_ranks_from_candidates(scores, matches)
                if rank is None:  # matches spread over most of the gallery: sort whole rows
                    if sorted_buf is None:
                        sorted_buf = torch.empty(rows, self.num_gallery, dtype=torch.float32, device=dev)
                    sorted_rows = _sort_rows(scores, sorted_buf[: stop - start], threads)  # ascending
                    rank = self._match_ranks(scores, sorted_rows, matches)
                ranks.append(rank.cpu())
                if self.topk:
                    kth = torch.topk(scores, self.topk, dim=1, sorted=True).values[:, -1]  # (C,)
                    topk_idx.append(self._topk(scores, kth, mask_buf[: stop - start]).cpu())
        finally:
            if own_threads:
                threads.close()
        num_matches = torch.where(groups >= 0, self.group_size[groups.clamp(min=0)], 0).cpu()
        topk_indices = topk_match = None
        if self.topk:
            topk_indices = torch.cat(topk_idx)  # (Q, k)
            topk_match = self.gallery_group.cpu()[topk_indices] == groups.cpu()[:, None]
        return QueryRanks(torch.cat(ranks), num_matches, self.num_gallery, topk_indices, topk_match)

    def _matches(self, scores: torch.Tensor, groups: torch.Tensor) -> Matches:
        """(C, M) gallery indices of each row's matches (0 where padded), their validity and scores."""
        members = self.table[groups.clamp(min=0)]  # (C, M) gallery indices, -1 pad
        member_ok = (members >= 0) & (groups >= 0)[:, None]
        members = members.clamp(min=0)
        return members, member_ok, scores.gather(1, members).contiguous()

    def _finish(
        self,
        scores: torch.Tensor,
        rank: torch.Tensor,
        below_or_equal: torch.Tensor,
        below: torch.Tensor,
        matches: Matches,
    ) -> torch.Tensor:
        """Ties resolved by gallery index, ranks ordered per row, padding zeroed."""
        members, member_ok, match_scores = matches
        tied = member_ok & (below_or_equal - below > 1)
        if bool(tied.any()):
            rank[tied] += _equal_before(scores, tied, members, match_scores)
        # Order each query's match ranks; padding sorts last and is then zeroed.
        rank = torch.where(member_ok, rank, scores.shape[1] + 1).sort(dim=1).values
        num_matches = member_ok.sum(dim=1, keepdim=True)  # (C, 1)
        return torch.where(torch.arange(self.max_matches, device=scores.device) < num_matches, rank, 0)

    def _match_ranks(self, scores: torch.Tensor, sorted_rows: torch.Tensor, matches: Matches) -> torch.Tensor:
        """(C, M) ranks of each query's matches, increasing, 0-padded, for one (C, G) block.

        A match's rank is 1 + (items scoring strictly higher) + (items scoring the same with a
        lower gallery index). The first count is a binary search in the sorted row; the second
        is non-zero only when the match's score occurs more than once in the row, which a
        second search reveals, and is then counted directly on the few tied pairs.
        """
        match_scores = matches[2]
        below_or_equal = torch.searchsorted(sorted_rows, match_scores, right=True)  # (C, M)
        below = torch.searchsorted(sorted_rows, match_scores, right=False)
        rank = (scores.shape[1] - below_or_equal) + 1  # (C, M)
        return self._finish(scores, rank, below_or_equal, below, matches)

    def _match_ranks_from_candidates(self, scores: torch.Tensor, matches: Matches) -> torch.Tensor | None:
        """The same ranks as :meth:`_match_ranks` without sorting whole rows.

        Only items scoring at least a row's lowest match score can rank above (or tie with)
        any of its matches. With a trained model those are a small share of the gallery, so
        only they are sorted: all rows' candidates at once, by (row, score) packed into one
        int64 key, and each match's counts are binary searches in that key array. Returns
        None when the candidates exceed ``CANDIDATE_SHARE`` of the block (sorting whole rows
        is then cheaper).
        """
        num_rows, num_gallery = scores.shape
        dev = scores.device
        _, member_ok, match_scores = matches
        inf = torch.tensor(float("inf"), device=dev)
        lowest = torch.where(member_ok, match_scores, inf).amin(dim=1)  # (C,); +inf: no match
        candidate = scores >= lowest[:, None]  # (C, G)
        if int(torch.count_nonzero(candidate)) > num_rows * num_gallery * CANDIDATE_SHARE:
            return None
        rows, cols = candidate.nonzero(as_tuple=True)
        row_base = torch.arange(num_rows, device=dev, dtype=torch.int64) * 2**32
        keys = torch.sort(row_base[rows] + _ascending_key(scores[rows, cols])).values  # (N,)
        match_keys = row_base[:, None] + _ascending_key(match_scores)  # (C, M)
        below_or_equal = torch.searchsorted(keys, match_keys, right=True)  # global positions
        below = torch.searchsorted(keys, match_keys, right=False)
        row_end = torch.searchsorted(keys, row_base + 2**32)  # (C,) end of each row's candidates
        rank = (row_end[:, None] - below_or_equal) + 1  # 1 + items scoring strictly higher
        return self._finish(scores, rank, below_or_equal, below, matches)

    def _match_ranks_per_row(
        self, scores: torch.Tensor, matches: Matches, threads: _RowThreads
    ) -> torch.Tensor:
        """The same ranks as :meth:`_match_ranks`, on CPU, sorting each row's candidates alone.

        A row's candidates are its items scoring at least its lowest match; only they can rank
        above (or tie with) a match. Each row's candidates are copied out and sorted with numpy's
        vectorised sort (float32 values, no indices), so a row costs one comparison pass plus a
        sort of its candidates, however deep its last match lies. Row blocks run on ``threads``
        (numpy releases the GIL while it sorts).
        """
        num_rows = scores.shape[0]
        _, member_ok, match_scores = matches
        lowest = torch.where(member_ok, match_scores, float("inf")).amin(dim=1)  # (C,); +inf: no match
        src, low, values = scores.numpy(), lowest.numpy(), match_scores.numpy()
        higher = np.empty(match_scores.shape, dtype=np.int64)  # items scoring strictly higher
        tie_span = np.empty(match_scores.shape, dtype=np.int64)  # items scoring the same, match included

        def rank_block(rows: range) -> None:
            for i in rows:
                row = src[i]
                # One pass selects the row's candidates (np.compress is several times faster
                # than boolean indexing, and per row as fast as a whole block's mask, count and
                # compress together), which are then sorted in place.
                candidates = np.compress(row >= low[i], row)
                candidates.sort()
                at_or_below = np.searchsorted(candidates, values[i], side="right")
                higher[i] = candidates.size - at_or_below
                tie_span[i] = at_or_below - np.searchsorted(candidates, values[i], side="left")

        threads.map(rank_block, num_rows)
        higher_t, span = torch.from_numpy(higher), torch.from_numpy(tie_span)
        # _finish reads "tied" from below_or_equal - below > 1; pass the span in that form.
        return self._finish(scores, higher_t + 1, span, torch.zeros_like(span), matches)

    def _topk(self, scores: torch.Tensor, kth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(C, k) indices of the k best gallery items per row, ties to the lower index; ``kth``
        is each row's k-th largest score."""
        num_rows, num_gallery = scores.shape
        dev = scores.device
        # Candidates: everything scoring at least the k-th best (k per row unless there are
        # ties). Sorting them by (row, score desc, index asc) puts the top k first in each row.
        torch.ge(scores, kth[:, None], out=mask)  # (C, G)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: cols ascend within a row
        key = rows * 2**32 + _descending_key(scores[rows, cols])
        order = torch.argsort(key, stable=True)  # stable: equal scores keep index order
        cols = cols[order]  # rows stay sorted: the key's high bits are the row
        per_row = torch.bincount(rows, minlength=num_rows)
        pos = torch.arange(rows.numel(), device=dev) - (per_row.cumsum(0) - per_row)[rows]
        top = pos < self.topk
        topk = torch.empty(num_rows, self.topk, dtype=torch.int64, device=dev)  # (C, k)
        topk[rows[top], pos[top]] = cols[top]
        return topk


def _sort_rows(scores: torch.Tensor, out: torch.Tensor, threads: _RowThreads) -> torch.Tensor:
    """Each row of ``scores`` sorted ascending (values only); on CPU written into ``out``.

    On CPU numpy's vectorised sort is many times faster than torch's on float32 rows; it
    releases the GIL, so row blocks sort in parallel on ``threads``.
    """
    if scores.device.type != "cpu":
        return torch.sort(scores, dim=1).values
    src, dst = scores.numpy(), out.numpy()

    def sort_block(rows: range) -> None:
        dst[rows.start : rows.stop] = src[rows.start : rows.stop]
        dst[rows.start : rows.stop].sort(axis=1)

    threads.map(sort_block, scores.shape[0])
    return out


def _equal_before(
    scores: torch.Tensor, tied: torch.Tensor, members: torch.Tensor, match_scores: torch.Tensor
) -> torch.Tensor:
    """For each tied (row, match) pair: how many items of the row have the same score and a lower index."""
    rows, slots = tied.nonzero(as_tuple=True)  # (P,)
    index = members[rows, slots]  # (P,) gallery index of the match
    value = match_scores[rows, slots]  # (P,)
    num_gallery = scores.shape[1]
    positions = torch.arange(num_gallery, device=scores.device)
    step = max(1, 2**24 // num_gallery)  # bound the (pairs, G) comparison block
    counts = []
    for i in range(0, rows.numel(), step):
        block = scores[rows[i : i + step]]  # (p, G)
        same = (block == value[i : i + step, None]) & (positions < index[i : i + step, None])
        counts.append(same.sum(dim=1))
    return torch.cat(counts)
