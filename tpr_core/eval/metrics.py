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
scoring strictly higher + the number of items with the same score and a lower index. Each
row of a chunk is sorted by value only (no indices: numpy's vectorised sort on CPU,
``torch.sort`` on GPU), and two binary searches per match give the first count and reveal
whether the match's score is shared; only those rare tied pairs are counted directly.
Top-k lists, when asked for, come from the few items scoring at least the k-th best,
sorted by (score desc, index asc).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "QueryRanks",
    "cmc_curve",
    "rank_gallery",
    "rank_gallery_from_features",
    "retrieval_metrics",
    "retrieval_metrics_from_features",
]


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
    chunk_size: int = 1024,
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
    chunk_size: int = 1024,
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

    return ranker.run(score_rows, qp.to(sim.device), sim.shape[0], chunk_size)


def rank_gallery_from_features(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor | np.ndarray | Sequence[int],
    gallery_pids: torch.Tensor | np.ndarray | Sequence[int],
    chunk_size: int = 1024,
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
    gt = g.t()  # (D, G) view; BLAS reads the transpose in place, no copy
    ranker = _Ranker(gp.to(dev), return_topk)

    # One score buffer for all chunks (see _Ranker.run).
    buffer = torch.empty(min(chunk_size, q.shape[0]), g.shape[0], dtype=torch.float32, device=dev)

    def score_rows(start: int, stop: int) -> torch.Tensor:
        qc = q[start:stop].to(dev, torch.float32)  # (C, D)
        if normalize:
            qc = F.normalize(qc, dim=1)
        return torch.mm(qc, gt, out=buffer[: stop - start])  # (C, G)

    return ranker.run(score_rows, qp.to(dev), q.shape[0], chunk_size)


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


def _check_no_nan(scores: torch.Tensor, row_offset: int) -> None:
    bad = torch.isnan(scores).any(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"query {int(bad.nonzero()[0, 0]) + row_offset}: a score is NaN (non-finite features?), "
            "ranks are undefined"
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


# (C, M) gallery indices of each query's matches (0 where padded), their validity, their scores.
Matches = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Above this share of a block's scores as candidates, whole rows are sorted instead.
CANDIDATE_SHARE = 0.25


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

    def run(self, score_rows, query_pids: torch.Tensor, num_queries: int, chunk_size: int) -> QueryRanks:
        groups = self.query_groups(query_pids)  # (Q,)
        rows = min(chunk_size, num_queries)
        dev = groups.device
        # Scratch blocks reused across chunks: on CPU a fresh (C, G) block per chunk costs page faults.
        sorted_buf = torch.empty(rows, self.num_gallery, dtype=torch.float32, device=dev)
        mask_buf = torch.empty(rows, self.num_gallery, dtype=torch.bool, device=dev) if self.topk else None
        ranks, topk_idx = [], []
        threads = torch.get_num_threads() if dev.type == "cpu" else 1
        pool = ThreadPoolExecutor(threads) if threads > 1 else None
        try:
            for start in range(0, num_queries, chunk_size):
                stop = min(start + chunk_size, num_queries)
                scores = score_rows(start, stop).detach()  # (C, G) float32
                _check_no_nan(scores, start)
                matches = self._matches(scores, groups[start:stop])
                rank = self._match_ranks_from_candidates(scores, matches)
                if rank is None:  # matches spread over most of the gallery: sort whole rows
                    sorted_rows = _sort_rows(scores, sorted_buf[: stop - start], pool, threads)  # ascending
                    rank = self._match_ranks(scores, sorted_rows, matches)
                ranks.append(rank.cpu())
                if self.topk:
                    kth = torch.topk(scores, self.topk, dim=1, sorted=True).values[:, -1]  # (C,)
                    topk_idx.append(self._topk(scores, kth, mask_buf[: stop - start]).cpu())
        finally:
            if pool is not None:
                pool.shutdown()
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
        self, scores: torch.Tensor, rank: torch.Tensor, below_or_equal: torch.Tensor, below: torch.Tensor,
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


def _sort_rows(
    scores: torch.Tensor, out: torch.Tensor, pool: ThreadPoolExecutor | None = None, workers: int = 1
) -> torch.Tensor:
    """Each row of ``scores`` sorted ascending (values only); on CPU written into ``out``.

    On CPU numpy's vectorised sort is many times faster than torch's on float32 rows; it
    releases the GIL, so ``workers`` row blocks sort in parallel on ``pool``'s threads.
    """
    if scores.device.type != "cpu":
        return torch.sort(scores, dim=1).values
    src, dst = scores.numpy(), out.numpy()

    def sort_block(rows: slice) -> None:
        dst[rows] = src[rows]
        dst[rows].sort(axis=1)

    step = -(-scores.shape[0] // workers)
    blocks = [slice(i, i + step) for i in range(0, scores.shape[0], step)]
    if pool is None or len(blocks) == 1:
        for block in blocks:
            sort_block(block)
    else:
        list(pool.map(sort_block, blocks))
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
