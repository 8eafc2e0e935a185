"""Samplers: no overlap across ranks, coverage, per-epoch reshuffle, P x K batches, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tpr_core.data.samplers import (
    DistributedBatchSampler,
    DistributedIdentitySampler,
    DistributedRandomSampler,
    IdentitySampler,
    RandomSampler,
    build_batch_sampler,
)


def _ranks(world: int, **kw) -> list[DistributedRandomSampler]:
    return [DistributedRandomSampler(rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_random_drop_last_disjoint_and_covers(world: int) -> None:
    n = 103
    samplers = _ranks(world, n=n, seed=7, drop_last=True)
    shares = [list(s) for s in samplers]
    assert all(len(x) == n // world == len(s) for x, s in zip(shares, samplers, strict=True))
    union = [i for x in shares for i in x]
    assert len(set(union)) == len(union) == (n // world) * world  # no overlap
    assert set(union) <= set(range(n))


def test_random_no_drop_last_covers_everything() -> None:
    n, world = 10, 4
    shares = [list(s) for s in _ranks(world, n=n, seed=0, drop_last=False)]
    assert [len(x) for x in shares] == [3, 3, 3, 3]
    flat = [i for x in shares for i in x]
    assert set(flat) == set(range(n))
    assert sum(c - 1 for c in Counter(flat).values()) == 2  # only the wrap-around repeats


def test_random_reshuffles_per_epoch_reproducibly() -> None:
    a = RandomSampler(50, seed=3)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1
    b = RandomSampler(50, seed=3)
    b.set_epoch(1)
    assert list(b) == e1  # same seed and epoch, same order
    c = RandomSampler(50, seed=4)
    assert list(c) != e0


def test_random_resume_gives_the_rest() -> None:
    s = DistributedRandomSampler(40, rank=1, world_size=2, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_start(7)
    assert list(s) == full[7:] and len(s) == 13
    s.set_epoch(3)  # a new epoch starts from the beginning
    assert len(s) == 20
    with pytest.raises(ValueError, match="start"):
        s.set_start(21)


def test_batch_wrapper_batches_and_resume() -> None:
    bs = DistributedBatchSampler(DistributedRandomSampler(50, rank=0, world_size=2, seed=1), 4)
    bs.set_epoch(5)
    batches = list(bs)
    assert len(batches) == bs.batches_per_epoch == 6 == len(bs)  # 25 // 4
    assert all(len(b) == 4 for b in batches)
    bs.set_start(4)
    assert list(bs) == batches[4:] and len(bs) == 2
    other = DistributedBatchSampler(DistributedRandomSampler(50, rank=1, world_size=2, seed=1), 4)
    other.set_epoch(5)
    assert not set(sum(batches, [])) & set(sum(list(other), []))


def _pids() -> np.ndarray:
    """40 identities with 1..9 rows each (some fewer than K=4), shuffled row order."""
    rng = np.random.default_rng(0)
    pids = np.concatenate([np.full(1 + p % 9, p) for p in range(40)])
    return rng.permutation(pids)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_identity_pk_batches_distinct_across_ranks(world: int) -> None:
    pids, k, bsz = _pids(), 4, 12  # P = 3
    samplers = [DistributedIdentitySampler(pids, bsz, k, r, world, seed=11) for r in range(world)]
    plans = [list(s) for s in samplers]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) > 0  # same length on every rank
    assert all(len(s) == len(plans[0]) == s.batches_per_epoch for s in samplers)
    counts = Counter(pids.tolist())
    used: list[int] = []
    for step in zip(*plans, strict=True):
        step_pids: list[int] = []
        for batch in step:
            assert len(batch) == bsz
            c = Counter(pids[batch].tolist())
            assert len(c) == 3 and set(c.values()) == {k}  # P identities x K rows
            step_pids += list(c)
        assert len(step_pids) == len(set(step_pids))  # distinct identities across ranks in a step
        used += [i for b in step for i in b]
    # rows of identities with >= K rows are used at most once per epoch over all ranks
    big = [i for i in used if counts[pids[i]] >= k]
    assert len(big) == len(set(big))


def test_identity_small_identities_sampled_with_replacement() -> None:
    pids = np.array([0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])  # pid 0: one row, pid 1: two rows
    s = IdentitySampler(pids, batch_size=4, k=4, seed=0)
    seen = Counter()
    for batch in s:
        (pid,) = set(pids[batch].tolist())
        seen[pid] += 1
        if pid == 0:
            assert batch == [0, 0, 0, 0]
    assert seen == {0: 1, 1: 1, 2: 1, 3: 1}  # one group each: every identity used once


def test_identity_reshuffle_reproducible_and_resume() -> None:
    pids = _pids()
    a = DistributedIdentitySampler(pids, 8, 4, rank=1, world_size=2, seed=5)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1
    b = DistributedIdentitySampler(pids, 8, 4, rank=1, world_size=2, seed=5)
    b.set_epoch(1)
    assert list(b) == e1
    b.set_start(3)
    assert list(b) == e1[3:] and len(b) == len(e1) - 3
    b.set_epoch(1)
    assert list(b) == e1


def test_identity_errors() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        IdentitySampler([0, 1, 2], batch_size=6, k=4)
    with pytest.raises(ValueError, match="identities cannot fill"):
        DistributedIdentitySampler([0, 0, 1, 1], 4, 2, rank=0, world_size=2)


def test_build_batch_sampler() -> None:
    pids = _pids()
    r = build_batch_sampler("random", pids, 8, rank=0, world_size=2, seed=0)
    i = build_batch_sampler("identity", pids, 8, k=4, rank=0, world_size=2, seed=0)
    assert isinstance(r, DistributedBatchSampler) and isinstance(i, DistributedIdentitySampler)
    assert len(r) == (len(pids) // 2) // 8
    with pytest.raises(ValueError, match="known samplers"):
        build_batch_sampler("balanced", pids, 8)


@pytest.mark.parametrize("kind", ["random", "identity", "identity_random_k"])
@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_do_not_depend_on_the_rank_count(kind: str, world: int) -> None:
    """Rank 0's block, then rank 1's, ... is the single-process batch, in its order, every step
    (the order in which the global batch is gathered for the loss terms)."""
    pids, global_batch, k = _pids(), 16, 2
    single = build_batch_sampler(kind, pids, global_batch, k=k, rank=0, world_size=1, seed=3)
    ranks = [build_batch_sampler(kind, pids, global_batch // world, k=k, rank=r, world_size=world, seed=3)
             for r in range(world)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        want = list(single)
        got = [sum(step, []) for step in zip(*(list(s) for s in ranks), strict=True)]
        assert len(want) > 2 and got == want
    # resuming mid-epoch skips the same global batches everywhere
    single.set_start(2)
    for s in ranks:
        s.set_start(2)
    assert [sum(step, []) for step in zip(*(list(s) for s in ranks), strict=True)] == list(single)


def test_identity_random_k_groups_of_one_to_k() -> None:
    """SEN's idrannum: per epoch each identity gives groups of one size n in [1, K]; a batch's
    rows of an identity come in whole groups except where a group straddles two batches."""
    pids = np.repeat(np.arange(60), 6)  # 60 identities x 6 rows
    s = build_batch_sampler("identity_random_k", pids, 32, k=2, seed=0)
    s.set_epoch(0)
    flat = sum(list(s), [])
    assert len(flat) == len(set(flat))  # 6 rows per identity: no group reuses a row
    sizes = Counter()
    run_pid, run_len = None, 0
    for p in pids[flat].tolist() + [-1]:
        if p == run_pid:
            run_len += 1
            continue
        if run_pid is not None:
            sizes[run_len] += 1
        run_pid, run_len = p, 1
    assert set(sizes) <= {1, 2, 3, 4} and sizes[1] > 0 and sizes[2] > 0  # adjacent groups may merge
    with pytest.raises(ValueError, match="identities"):
        build_batch_sampler("identity_random_k", np.arange(10), 32, k=2)
