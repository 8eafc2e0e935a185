"""Samplers for training: random and identity-balanced, split across ranks without overlap.

Kinds of object:

- :class:`DistributedRandomSampler` is an *index* sampler (yields row indices of this
  rank); :class:`DistributedBatchSampler` groups it into batches.
- :class:`DistributedIdentitySampler` is a *batch* sampler (yields lists of row indices,
  P identities x K rows each).
- :func:`build_batch_sampler` returns a batch sampler of either kind; that is what a
  training loop gives ``DataLoader(batch_sampler=...)``.

Common rules: an epoch is reshuffled from ``seed + epoch`` (:meth:`set_epoch`), so every
rank computes the same global plan and takes its own share; all ranks get the same number
of batches of the same size, so collective operations stay in step (the last incomplete
global batch of an epoch is dropped). The batch samplers plan *global* batches, as one
process with the whole batch would draw them, and give rank ``r`` the ``r``-th block of
each: rank 0's rows, then rank 1's, ... are the single-process batch in its order, which is
the order in which ``tpr_core.distributed.GlobalBatch`` gathers them. The global batch at
every step is therefore the same whatever the number of ranks; :meth:`set_start` skips what a
checkpoint says was already consumed this epoch (``set_epoch`` resets it to 0, so call
``set_start`` after it). For the batch samplers the position counts batches; for the index
sampler it counts samples of this rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class DistributedRandomSampler(Sampler[int]):
    """A random permutation per epoch, dealt round-robin to ranks.

    Args:
        n: dataset size.
        rank, world_size: this rank and the number of ranks.
        seed: base seed; epoch ``e`` uses permutation ``seed + e``.
        drop_last: drop the tail so every rank gets ``n // world_size`` indices; otherwise
            the permutation is wrapped around to ``ceil(n / world_size)`` per rank (a few
            indices then appear twice in the epoch).
    """

    def __init__(
        self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool = True
    ) -> None:
        _check_rank(rank, world_size)
        if n < 1:
            raise ValueError(f"cannot sample from an empty dataset (n={n})")
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.seed, self.drop_last = int(seed), bool(drop_last)
        self.epoch = 0
        self.start = 0
        self.num_samples = n // world_size if drop_last else -(-n // world_size)
        if self.num_samples == 0:
            raise ValueError(f"n={n} rows cannot give each of {world_size} ranks a sample with drop_last")

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s permutation from now on and start it from the beginning."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside [0, {self.num_samples}]")
        self.start = int(start)

    def epoch_indices(self) -> list[int]:
        """This rank's whole share of the current epoch (ignores ``start``)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.num_samples * self.world_size
        if total > self.n:  # wrap around so that every rank gets the same count
            perm = perm.repeat(-(-total // self.n))
        return perm[:total][self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class RandomSampler(DistributedRandomSampler):
    """Single-process :class:`DistributedRandomSampler` (rank 0 of 1), every index each epoch."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, 0, 1, seed, drop_last=True)


class DistributedBatchSampler(Sampler[list[int]]):
    """Global batches of one permutation, one block of each per rank; positions count batches.

    Step ``b`` takes the global batch ``perm[b*G : (b+1)*G]`` (``G = batch_size x world``) of
    the :class:`DistributedRandomSampler`'s epoch permutation, and rank ``r`` its rows
    ``[r*batch_size, (r+1)*batch_size)``. A run with one rank and ``batch_size = G`` draws the
    same global batches in the same order.

    Args:
        sampler: the index sampler (its rank, world size, seed and epoch are used).
        batch_size: batch size per rank.
        drop_last: drop the last incomplete global batch (same on every rank).
    """

    def __init__(self, sampler: DistributedRandomSampler, batch_size: int, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), bool(drop_last)
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _global_permutation(self) -> list[int]:
        s = self.sampler
        g = torch.Generator()
        g.manual_seed(s.seed + s.epoch)
        perm = torch.randperm(s.n, generator=g)
        total = self.batches_per_epoch * self.batch_size * s.world_size
        if total > s.n:  # without drop_last: wrap around so every rank fills its last batch
            perm = perm.repeat(-(-total // s.n))
        return perm[:total].tolist()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.start = 0

    def set_start(self, batch_index: int) -> None:
        """Skip the first ``batch_index`` batches of the current epoch."""
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"batch_index {batch_index} outside [0, {self.batches_per_epoch}]")
        self.start = int(batch_index)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self._global_permutation()
        step = self.batch_size * self.sampler.world_size
        for b in range(self.start, self.batches_per_epoch):
            first = b * step + self.sampler.rank * self.batch_size
            yield perm[first : first + self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


class DistributedIdentitySampler(Sampler[list[int]]):
    """Identity-balanced global batches: P identities x K rows per step over all ranks.

    Per epoch (IRRA's random-identity sampling over the global batch): each identity's rows
    are shuffled and cut into groups of K (an identity with fewer than K rows is sampled with
    replacement to K; a last incomplete group is dropped). Each step draws ``P = world_size x
    batch_size_per_rank / K`` distinct identities among those with groups left (weighted by
    the number of groups left) and takes one group of each: the global batch, K rows per
    identity, exactly as one process with the whole batch draws it. Rank ``r`` takes the
    ``r``-th block of ``batch_size_per_rank`` rows (an identity's K rows may then span two
    ranks; the gathered batch-level losses see them together). The epoch ends when fewer than
    P identities have groups left, so the batch count can vary slightly between epochs; it is
    the same on every rank. Within an epoch, no group is used twice.

    Args:
        pids: identity of every row (length N).
        batch_size_per_rank: rows per batch per rank; ``world_size x batch_size_per_rank`` is a
            multiple of ``k``.
        k: rows per identity in a batch (``data.instances_per_identity``).
        rank, world_size: this rank and the number of ranks.
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray,
        batch_size_per_rank: int,
        k: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        _check_rank(rank, world_size)
        self._check_sizes(int(batch_size_per_rank), int(k), int(world_size))
        pids = np.asarray(pids, dtype=np.int64)
        self.k, self.batch_size = int(k), int(batch_size_per_rank)
        self.p_global = max(1, self.batch_size * int(world_size) // self.k)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        order = np.argsort(pids, kind="stable")
        uniq, starts = np.unique(pids[order], return_index=True)
        self._rows = np.split(order, starts[1:])  # rows of each identity, ascending pid
        self.num_identities = len(uniq)
        if self.num_identities < self.p_global:
            raise ValueError(
                f"{self.num_identities} identities cannot fill one global batch of {self.p_global} "
                f"identities ({self.world_size} rank(s) x batch_size_per_rank {self.batch_size} / k {self.k})"
            )
        self.epoch = 0
        self.start = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    @staticmethod
    def _check_sizes(batch_size_per_rank: int, k: int, world_size: int) -> None:
        if k < 1 or batch_size_per_rank < 1 or (batch_size_per_rank * world_size) % k:
            raise ValueError(
                f"the global batch {batch_size_per_rank * world_size} (batch_size_per_rank "
                f"{batch_size_per_rank} x world_size {world_size}) must be a positive multiple of "
                f"instances_per_identity k={k}"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, batch_index: int) -> None:
        """Skip the first ``batch_index`` batches of the current epoch."""
        n = len(self._plan())
        if not 0 <= batch_index <= n:
            raise ValueError(f"batch_index {batch_index} outside [0, {n}]")
        self.start = int(batch_index)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan())

    def _global_plan(self, epoch: int) -> list[list[list[int]]]:
        """Every step of ``epoch``: a list of ``world_size`` batches of indices."""
        rng = np.random.default_rng(self.seed + epoch)
        queues: list[list[np.ndarray]] = []
        for rows in self._rows:
            if len(rows) < self.k:
                picked = rng.choice(rows, size=self.k, replace=True)
            else:
                picked = rng.permutation(rows)
            queues.append([picked[j : j + self.k] for j in range(0, len(picked) - self.k + 1, self.k)])
        avail = [i for i, q in enumerate(queues) if q]
        need = self.p_global
        steps: list[list[list[int]]] = []
        while len(avail) >= need:
            # Weighted by groups left, so identities with many groups are not stranded at the
            # end of the epoch (more batches per epoch than a uniform draw gives).
            left = np.array([len(queues[i]) for i in avail], dtype=np.float64)
            chosen = rng.choice(len(avail), size=need, replace=False, p=left / left.sum())
            ids = [avail[c] for c in chosen]
            flat = np.concatenate([queues[i].pop() for i in ids])
            steps.append(
                [
                    flat[r * self.batch_size : (r + 1) * self.batch_size].tolist()
                    for r in range(self.world_size)
                ]
            )
            if any(not queues[i] for i in ids):
                avail = [i for i in avail if queues[i]]
        return steps

    def _plan(self) -> list[list[int]]:
        """This rank's batches for the current epoch (cached per epoch)."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            plan = [step[self.rank] for step in self._global_plan(self.epoch)]
            self._plan_cache = (self.epoch, plan)
        return self._plan_cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._plan()[self.start :])

    def __len__(self) -> int:
        return len(self._plan()) - self.start


class DistributedIdentityRandomKSampler(DistributedIdentitySampler):
    """UIT's sampler (SEN's ``RandomIdnumSampler``, ``--sampler idrannum``): each identity
    contributes groups of 1..K rows, K drawn per identity and epoch.

    Per epoch: each identity draws its group size n uniformly in ``[1, K]``, shuffles its rows
    (sampled with replacement up to n when it has fewer) and cuts them into groups of n (a
    last incomplete group is dropped). Rounds then draw ``P = G // K`` distinct identities
    uniformly among those with groups left (``G`` the global batch) and append one group of
    each to one list, until fewer than P identities have groups left. The list is cut into
    global batches of G rows (the last incomplete one dropped), and rank ``r`` takes the
    ``r``-th block of each, like the other batch samplers. As in SEN, a group may straddle two
    batches, and the number of identities per batch varies.

    Args: as :class:`DistributedIdentitySampler` (``k``: the largest group, SEN's
    ``num_instance``, 2 for UIT).
    """

    @staticmethod
    def _check_sizes(batch_size_per_rank: int, k: int, world_size: int) -> None:
        if k < 1 or batch_size_per_rank < 1:
            raise ValueError(f"need batch_size_per_rank >= 1 and k >= 1, got {batch_size_per_rank} and {k}")

    def _global_plan(self, epoch: int) -> list[list[list[int]]]:
        rng = np.random.default_rng(self.seed + epoch)
        queues: list[list[np.ndarray]] = []
        for rows in self._rows:
            n = int(rng.integers(1, self.k + 1))
            picked = rng.choice(rows, size=n, replace=True) if len(rows) < n else rng.permutation(rows)
            queues.append([picked[j : j + n] for j in range(0, len(picked) - n + 1, n)])
        avail = [i for i, q in enumerate(queues) if q]
        flat: list[np.ndarray] = []
        while len(avail) >= self.p_global:
            chosen = rng.choice(len(avail), size=self.p_global, replace=False)
            ids = [avail[c] for c in chosen]
            flat += [queues[i].pop(0) for i in ids]
            if any(not queues[i] for i in ids):
                avail = [i for i in avail if queues[i]]
        rows = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        g = self.batch_size * self.world_size
        return [
            [rows[b * g + r * self.batch_size : b * g + (r + 1) * self.batch_size].tolist() for r in range(self.world_size)]
            for b in range(len(rows) // g)
        ]


class IdentitySampler(DistributedIdentitySampler):
    """Single-process :class:`DistributedIdentitySampler` (rank 0 of 1)."""

    def __init__(self, pids: Sequence[int] | np.ndarray, batch_size: int, k: int, seed: int = 0) -> None:
        super().__init__(pids, batch_size, k, 0, 1, seed)


def build_batch_sampler(
    kind: str,
    pids: Sequence[int] | np.ndarray,
    batch_size_per_rank: int,
    k: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool = True,
) -> DistributedBatchSampler | DistributedIdentitySampler:
    """The training batch sampler named by ``data.sampler`` (``random``, ``identity`` or
    ``identity_random_k``).

    Both kinds have ``set_epoch(e)``, ``set_start(batch_index)``, ``batches_per_epoch`` and
    ``len()`` (batches left in the epoch).
    """
    if kind == "random":
        return DistributedBatchSampler(
            DistributedRandomSampler(len(pids), rank, world_size, seed, drop_last),
            batch_size_per_rank,
            drop_last,
        )
    if kind == "identity":
        return DistributedIdentitySampler(pids, batch_size_per_rank, k, rank, world_size, seed)
    if kind == "identity_random_k":
        return DistributedIdentityRandomKSampler(pids, batch_size_per_rank, k, rank, world_size, seed)
    raise ValueError(f"unknown sampler {kind!r}; known samplers: ['identity', 'identity_random_k', 'random']")
