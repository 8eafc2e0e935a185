"""Retrieval metrics against hand-computed cases and a plain per-query brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tpr_core.eval import (
    cmc_curve,
    rank_gallery,
    rank_gallery_from_features,
    retrieval_metrics,
    retrieval_metrics_from_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, params=["row-candidates", "candidates", "sorted-rows"])
def ranking_path(request, monkeypatch):
    """Every test runs on each way of finding match ranks: the CPU's per-row sort of the items
    scoring at least the row's lowest match; the other devices' sort of all rows' candidates
    at once (taken whenever allowed here); and their sort of whole rows. Features are scored
    with numpy's matmul on the CPU's own path, with torch.mm on the others."""
    from tpr_core.eval import metrics

    monkeypatch.setattr(metrics, "CPU_ROW_CANDIDATES", request.param == "row-candidates")
    monkeypatch.setattr(metrics, "CPU_NUMPY_MATMUL", request.param == "row-candidates")
    monkeypatch.setattr(metrics, "CANDIDATE_SHARE", 1.0 if request.param == "candidates" else -1.0)
    return request.param


# --------------------------------------------------------------------------- brute force


def brute_force(sim: torch.Tensor, query_pids, gallery_pids, ks=(1, 5, 10)):
    """Per-query loop: order the gallery by (-score, index), read off the match ranks."""
    rows = sim.tolist()  # python floats: exact copies of the float32 scores
    qp, gp = list(map(int, query_pids)), list(map(int, gallery_pids))
    per_query = []
    for i, row in enumerate(rows):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks = [pos + 1 for pos, j in enumerate(order) if gp[j] == qp[i]]
        per_query.append((ranks, order))
    valid = [r for r, _ in per_query if r]
    out = {}
    for k in ks:
        out[f"R{k}"] = 100.0 * sum(r[0] <= k for r in valid) / len(valid)
    out["mAP"] = (
        100.0 * sum(sum(n / rk for n, rk in enumerate(r, start=1)) / len(r) for r in valid) / len(valid)
    )
    out["mINP"] = 100.0 * sum(len(r) / r[-1] for r in valid) / len(valid)
    out["num_queries"] = float(len(rows))
    out["num_valid_queries"] = float(len(valid))
    return out, per_query


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def make_pids(generator: torch.Generator):
    """Gallery: ids with 1 to 5 images (several singletons); queries: 2 captions per image + a stranger."""
    sizes = torch.tensor([1, 3, 1, 5, 2, 1, 4, 2, 1, 3, 2, 1])
    gallery_pids = torch.repeat_interleave(torch.arange(len(sizes)) * 7 + 3, sizes)  # non-contiguous pids
    gallery_pids = gallery_pids[torch.randperm(len(gallery_pids), generator=generator)]
    query_pids = torch.cat([gallery_pids.repeat_interleave(2), torch.tensor([999, 999])])  # 999: no image
    query_pids = query_pids[torch.randperm(len(query_pids), generator=generator)]
    return query_pids, gallery_pids


def quantised_unit_feats(n: int, generator: torch.Generator, dim: int = 8) -> torch.Tensor:
    """Rows with exactly four +-1 entries: norm 2 exactly, so normalised dot products are exact and tie often."""
    feats = torch.zeros(n, dim)
    for i in range(n):
        cols = torch.randperm(dim, generator=generator)[:4]
        feats[i, cols] = torch.randint(0, 2, (4,), generator=generator).float() * 2 - 1
    return feats


# --------------------------------------------------------------------------- hand-checked cases


def test_hand_checked_matches_at_ranks_2_and_4():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    got = retrieval_metrics(sim, [1], [0, 1, 0, 1, 2], ks=(1, 2, 5))
    # AP = (1/2 + 2/4) / 2 = 0.5; INP = 2 matches / last rank 4 = 0.5.
    assert got["R1"] == 0.0 and got["R2"] == 100.0 and got["R5"] == 100.0
    assert got["mAP"] == pytest.approx(50.0) and got["mINP"] == pytest.approx(50.0)
    assert got["num_queries"] == 1.0 and got["num_valid_queries"] == 1.0


def test_hand_checked_two_queries_average():
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # pid 1 at indices 1 and 0: ranks 1 and 6
            [0.3, 0.2, 0.9, 0.1, 0.8, 0.0],  # pid 2 at index 3: rank 5
        ]
    )
    gallery = [1, 1, 0, 2, 0, 0]
    got = retrieval_metrics(sim, [1, 2], gallery, ks=(1, 5))
    ap = [(1 / 1 + 2 / 6) / 2, 1 / 5]
    inp = [2 / 6, 1 / 5]
    assert got["R1"] == pytest.approx(50.0)
    assert got["R5"] == pytest.approx(100.0)  # first matches at ranks 1 and 5
    assert got["mAP"] == pytest.approx(100 * sum(ap) / 2)
    assert got["mINP"] == pytest.approx(100 * sum(inp) / 2)


def test_inp_differs_from_ap():
    # Matches at ranks 1 and 5: AP = (1 + 2/5) / 2 = 0.7, INP = 2/5 = 0.4.
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    got = retrieval_metrics(sim, [5], [5, 0, 1, 2, 5, 3])
    assert got["mAP"] == pytest.approx(70.0)
    assert got["mINP"] == pytest.approx(40.0)
    assert got["R1"] == 100.0


def test_ties_broken_by_gallery_index():
    flat = torch.full((1, 5), 0.5)
    # All scores equal: the order is the gallery order.
    assert retrieval_metrics(flat, [7], [0, 0, 0, 7, 0], ks=(3, 4))["R3"] == 0.0
    assert retrieval_metrics(flat, [7], [0, 0, 0, 7, 0], ks=(3, 4))["R4"] == 100.0
    assert retrieval_metrics(flat, [7], [7, 0, 0, 0, 0])["mAP"] == pytest.approx(100.0)
    # One higher score first, then the tied block in index order: match at index 2 ranks 3rd.
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.5]])
    ranks = rank_gallery(sim, [7], [0, 0, 7, 0], return_topk=4)
    assert ranks.match_ranks.tolist() == [[3, 0, 0]]  # padded to the largest pid group (pid 0)
    assert ranks.topk_indices.tolist() == [[1, 0, 2, 3]]
    assert ranks.topk_match.tolist() == [[False, False, True, False]]


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0, so the tie goes to the lower index (0), though its bit pattern is "smaller".
    sim = torch.tensor([[-0.0, 0.0, -1.0]])
    assert rank_gallery(sim, [1], [1, 0, 0]).first_match_rank.tolist() == [1]
    assert rank_gallery(sim, [1], [0, 1, 0]).first_match_rank.tolist() == [2]


def test_negative_scores_ordered_correctly():
    sim = torch.tensor([[-0.5, -0.25, -2.0, 0.125, -1e-30]])
    # Order: 3 (0.125), 4 (-1e-30), 1 (-0.25), 0 (-0.5), 2 (-2.0).
    ranks = rank_gallery(sim, [0], [0, 0, 0, 0, 0], return_topk=5)
    assert ranks.topk_indices.tolist() == [[3, 4, 1, 0, 2]]
    assert ranks.match_ranks.tolist() == [[1, 2, 3, 4, 5]]


def test_query_without_match_is_excluded_and_counted():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    got = retrieval_metrics(sim, [0, 5], [0, 1], ks=(1,))
    assert got["R1"] == 100.0 and got["mAP"] == 100.0
    assert got["num_queries"] == 2.0 and got["num_valid_queries"] == 1.0
    ranks = rank_gallery(sim, [0, 5], [0, 1])
    assert ranks.num_matches.tolist() == [1, 0]
    assert math.isnan(float(ranks.average_precision()[1]))
    with pytest.raises(ValueError, match="no query has a matching pid"):
        retrieval_metrics(sim, [5, 6], [0, 1])


# --------------------------------------------------------------------------- brute force, random data


@pytest.mark.parametrize("kind", ["continuous", "quantised"])
def test_matrix_path_matches_brute_force(kind):
    gen = torch.Generator().manual_seed(0 if kind == "continuous" else 1)
    qp, gp = make_pids(gen)
    if kind == "continuous":
        sim = torch.randn(len(qp), len(gp), generator=gen)
    else:
        sim = torch.randint(-2, 3, (len(qp), len(gp)), generator=gen).float() / 4  # many ties
    want, per_query = brute_force(sim, qp, gp, ks=(1, 3, 5, 10))
    ranks = rank_gallery(sim, qp, gp, return_topk=len(gp))
    assert_metrics_close(ranks.metrics(ks=(1, 3, 5, 10)), want)
    for i, (match_ranks, order) in enumerate(per_query):
        assert ranks.match_ranks[i, : len(match_ranks)].tolist() == match_ranks
        assert ranks.match_ranks[i, len(match_ranks) :].eq(0).all()
        assert ranks.topk_indices[i].tolist() == order
    assert want["num_valid_queries"] == len(qp) - 2  # the two strangers


def test_per_query_ap_inp_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    qp, gp = make_pids(gen)
    sim = torch.randint(-3, 4, (len(qp), len(gp)), generator=gen).float()
    _, per_query = brute_force(sim, qp, gp)
    ranks = rank_gallery(sim, qp, gp)
    ap, inp = ranks.average_precision(), ranks.inverse_negative_penalty()
    for i, (match_ranks, _) in enumerate(per_query):
        if not match_ranks:
            assert math.isnan(float(ap[i])) and math.isnan(float(inp[i]))
            continue
        want_ap = sum(n / r for n, r in enumerate(match_ranks, start=1)) / len(match_ranks)
        assert float(ap[i]) == pytest.approx(want_ap, rel=1e-12)
        assert float(inp[i]) == pytest.approx(len(match_ranks) / match_ranks[-1], rel=1e-12)


def test_cmc_curve_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    qp, gp = make_pids(gen)
    sim = torch.randn(len(qp), len(gp), generator=gen)
    ks = tuple(range(1, len(gp) + 3))
    want, _ = brute_force(sim, qp, gp, ks=ks)
    cmc = cmc_curve(rank_gallery(sim, qp, gp), max_k=len(ks))
    assert cmc.shape == (len(ks),)
    for k in ks:
        assert cmc[k - 1] == pytest.approx(want[f"R{k}"], rel=1e-12)
    assert cmc[-1] == pytest.approx(100.0)


# --------------------------------------------------------------------------- chunked vs matrix


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_features_identical_to_matrix(normalize):
    gen = torch.Generator().manual_seed(4)
    qp, gp = make_pids(gen)
    q = quantised_unit_feats(len(qp), gen)
    g = quantised_unit_feats(len(gp), gen)
    # Entries +-1 (or +-0.5 once normalised): every dot product is exact, whatever the chunking.
    sim = (F.normalize(q, dim=1) @ F.normalize(g, dim=1).T) if normalize else q @ g.T
    want_ranks = rank_gallery(sim, qp, gp, return_topk=10)
    want, _ = brute_force(sim, qp, gp)
    assert_metrics_close(want_ranks.metrics(), want)
    for chunk_size in (1, 7, len(qp), len(qp) + 50):
        got = rank_gallery_from_features(
            q, g, qp, gp, chunk_size=chunk_size, device="cpu", normalize=normalize, return_topk=10
        )
        assert torch.equal(got.match_ranks, want_ranks.match_ranks), chunk_size
        assert torch.equal(got.num_matches, want_ranks.num_matches)
        assert torch.equal(got.topk_indices, want_ranks.topk_indices)
        assert torch.equal(got.topk_match, want_ranks.topk_match)
        assert got.metrics() == want_ranks.metrics()
        metrics = retrieval_metrics_from_features(
            q, g, qp, gp, chunk_size=chunk_size, device="cpu", normalize=normalize
        )
        assert metrics == want_ranks.metrics()


def test_parallel_cpu_sort_identical():
    # The CPU path scores and sorts row blocks on a thread pool when torch has several threads.
    gen = torch.Generator().manual_seed(8)
    qp, gp = make_pids(gen)
    sim = torch.randint(-2, 3, (len(qp), len(gp)), generator=gen).float()
    want, _ = brute_force(sim, qp, gp)
    torch.set_num_threads(2)  # the autouse fixture restores the setting
    for chunk_size in (1, 7, 1000):
        assert_metrics_close(rank_gallery(sim, qp, gp, chunk_size=chunk_size).metrics(), want)
    # From features, each thread also scores its own rows (one BLAS thread each): small
    # integer features give exact integer scores with many ties across the threads' rows.
    q = torch.randint(-2, 3, (len(qp), 4), generator=gen).float()
    g = torch.randint(-2, 3, (len(gp), 4), generator=gen).float()
    want, _ = brute_force(q @ g.T, qp, gp)
    for chunk_size in (1, 7, 1000):
        got = retrieval_metrics_from_features(q, g, qp, gp, chunk_size=chunk_size, device="cpu", normalize=False)
        assert_metrics_close(got, want)


def test_matrix_chunk_size_does_not_change_results():
    gen = torch.Generator().manual_seed(5)
    qp, gp = make_pids(gen)
    sim = torch.randint(-2, 3, (len(qp), len(gp)), generator=gen).float()
    base = rank_gallery(sim, qp, gp, return_topk=5, chunk_size=len(qp))
    for chunk_size in (1, 3, 1000):
        other = rank_gallery(sim, qp, gp, return_topk=5, chunk_size=chunk_size)
        assert torch.equal(other.match_ranks, base.match_ranks)
        assert torch.equal(other.topk_indices, base.topk_indices)


def test_continuous_features_agree_with_brute_force():
    gen = torch.Generator().manual_seed(6)
    qp, gp = make_pids(gen)
    q, g = torch.randn(len(qp), 16, generator=gen), torch.randn(len(gp), 16, generator=gen)
    got = retrieval_metrics_from_features(q, g, qp, gp, chunk_size=9, device="cpu")
    want, _ = brute_force(F.normalize(q, dim=1) @ F.normalize(g, dim=1).T, qp, gp)
    assert_metrics_close(got, want)


def test_topk_larger_than_gallery_is_clamped():
    sim = torch.tensor([[0.1, 0.3, 0.2]])
    ranks = rank_gallery(sim, [0], [0, 1, 0], return_topk=10)
    assert ranks.topk_indices.tolist() == [[1, 2, 0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_identical_to_cpu():
    gen = torch.Generator().manual_seed(7)
    qp, gp = make_pids(gen)
    q, g = quantised_unit_feats(len(qp), gen), quantised_unit_feats(len(gp), gen)
    cpu = rank_gallery_from_features(q, g, qp, gp, chunk_size=5, device="cpu", return_topk=10)
    gpu = rank_gallery_from_features(q, g, qp, gp, chunk_size=5, device="cuda", return_topk=10)
    assert torch.equal(cpu.match_ranks, gpu.match_ranks)
    assert torch.equal(cpu.topk_indices, gpu.topk_indices)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_with_names():
    sim = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="pid counts"):
        retrieval_metrics(sim, [0], [0, 1, 2])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.zeros(3), [0], [0, 1, 2])
    with pytest.raises(ValueError, match="integer person ids"):
        retrieval_metrics(sim, [0.5, 1.0], [0, 1, 2])
    with pytest.raises(ValueError, match="row 1"):
        retrieval_metrics(torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]]), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="gallery_feats row 2"):
        retrieval_metrics_from_features(
            torch.ones(2, 4), torch.tensor([[1.0] * 4, [1.0] * 4, [float("inf")] * 4]), [0, 1], [0, 1, 2]
        )
    with pytest.raises(ValueError, match="same D"):
        retrieval_metrics_from_features(torch.ones(2, 4), torch.ones(3, 5), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics_from_features(torch.ones(2, 4), torch.ones(3, 4), [0, 1], [0, 1, 2], chunk_size=0)
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(sim, [0, 1], [0, 1, 2], ks=(0,))


def test_overflowing_scores_are_refused_not_ranked():
    """Unnormalised finite features whose products overflow give inf or NaN scores (which one
    depends on the BLAS); the finiteness check, skipped only when the scores are provably
    finite, must name the query."""
    from tpr_core.eval.metrics import _scores_bounded

    big = 3e19  # big * big * 2 overflows float32, each feature is finite
    q = torch.tensor([[1.0, 1.0], [big, -big]])
    g = torch.tensor([[1.0, 0.0], [big, big], [0.0, 1.0]])
    assert not _scores_bounded(q, g, normalized=False)
    assert _scores_bounded(q, g / big, normalized=False)
    assert _scores_bounded(q, g, normalized=True)
    # float64 features beyond float32's range turn into inf when scored in float32
    assert not _scores_bounded(torch.tensor([[1e300, 0.0]], dtype=torch.float64), g, normalized=True)
    with pytest.raises(ValueError, match="query 1"):
        retrieval_metrics_from_features(q, g, [0, 1], [0, 1, 2], normalize=False)
    # normalised, the same features rank fine
    out = retrieval_metrics_from_features(q, g, [0, 1], [0, 1, 2], normalize=True)
    assert out["num_valid_queries"] == 2.0
