"""The batch-level loss terms see the global batch: N ranks compute what one process computes.

Real processes: the ranks are spawned Python processes in a gloo process group. For every
method (and the other form of each loss switch), one process runs the global batch of 16; 2 ranks (and, for FMFA, 4 ranks) run their
blocks of it with ``GlobalBatch``. Every loss term and the total, averaged over the ranks (as
the training loop logs them), must agree with the single process at rtol 1e-5, and every
parameter's gradient, averaged over the ranks (as DeepSpeed's data-parallel reduction does),
at rtol 1e-4 (atol 1e-6 of the largest gradient, for entries that are zero up to rounding).
With ``loss.gather=local`` the same comparison must fail, so the test can.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.tpr_core.test_models import Tok, _batch, _cfg
from tpr_core.distributed import LOCAL, GlobalBatch, batch_scope
from tpr_core.experiment import config_from_dict
from tpr_core.models import build_method, known_methods

B = 16
# Identities that repeat inside a block and across the blocks of 2 and 4 ranks, in an order
# where a row's first positive is not always its own pair (A-SDM's code form reads it).
PIDS = torch.tensor([3, 0, 5, 3, 1, 6, 0, 2, 4, 5, 7, 1, 2, 6, 7, 4])
LOSS = {"bmm_mask_ratio": 0.0}  # IVT's BMM draws per rank (see methods.IVT)
# Every method with its default forms, and the other form of each switch.
CASES = {
    **{m: (m, {}) for m in known_methods()},
    "fmfa-paper": ("fmfa", {"a_sdm_form": "paper", "efa_form": "paper"}),
    "ivt-separate-l2": ("ivt", {"mla_form": "separate", "cmpm_label_norm": "l2"}),
}


def _model(case: str):
    method, loss = CASES[case]
    cfg = config_from_dict({**_cfg(method).model_dump(), "loss": {**LOSS, **loss}})
    torch.manual_seed(1)
    model = build_method(cfg, num_classes=int(PIDS.max()) + 1, vocab=Tok())
    model.train()
    return cfg, model


def _global_batch() -> dict[str, torch.Tensor]:
    batch = _batch(B, seed=5)
    batch["pids"] = PIDS.clone()
    batch["sample_seed"] = torch.arange(B) * 7919 + 11  # UIT draws each sample's dropped patches
    return batch


def _run(case: str, batch, scope) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Forward, terms, backward on ``batch``: the terms (and total) and every parameter's grad."""
    cfg, model = _model(case)
    terms = model.loss_terms(model(batch), batch, scope)
    total = sum(cfg.loss.weights[k] * v for k, v in terms.items())
    total.backward()
    values = {k: float(v.detach()) for k, v in terms.items()}
    values["total"] = float(total.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return values, grads


def _rank_main(rank: int, world: int, port: int, methods: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        batch = _global_batch()
        per = B // world
        mine = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        for method in methods:
            for mode in ("global", "local"):
                scope = batch_scope(mode)
                assert isinstance(scope, GlobalBatch if mode == "global" else type(LOCAL))
                values, grads = _run(method, mine, scope)
                # What the loop logs and what DeepSpeed applies: means over the ranks.
                vals = torch.tensor(list(values.values()), dtype=torch.float64)
                dist.all_reduce(vals)
                values = dict(zip(values, (vals / world).tolist(), strict=True))
                for g in grads.values():
                    dist.all_reduce(g)
                    g /= world
                results[(method, mode)] = (values, grads)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, methods: list[str], tmp: Path) -> dict:
    out = str(tmp / f"world{world}.pt")
    mp.spawn(_rank_main, args=(world, _free_port(), methods, out), nprocs=world, join=True)
    return torch.load(out, weights_only=False)  # written by this test's own ranks


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def _grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> list[str]:
    assert set(got) == set(want)
    scale = max(float(g.abs().max()) for g in want.values())
    return [n for n in want if not torch.allclose(got[n], want[n], rtol=rtol, atol=1e-6 * scale)]


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[dict[str, float], dict[str, torch.Tensor]]]:
    torch.set_num_threads(1)
    return {c: _run(c, _global_batch(), LOCAL) for c in CASES}


def _check(results: dict, reference: dict, methods: list[str]) -> None:
    for method in methods:
        ref_values, ref_grads = reference[method]
        values, grads = results[(method, "global")]
        for k, v in ref_values.items():
            assert _close(values[k], v, 1e-5), (method, k, values[k], v)
        bad = _grads_close(grads, ref_grads, 1e-4)
        assert not bad, (method, bad[:5])
        # The local form sees each rank's share only: a batch-level term and the gradients move.
        local_values, local_grads = results[(method, "local")]
        assert not all(_close(local_values[k], v, 1e-5) for k, v in ref_values.items()), method
        assert _grads_close(local_grads, ref_grads, 1e-4), method


def test_two_ranks_equal_one_process(reference, tmp_path) -> None:
    cases = list(CASES)
    _check(_spawn(2, cases, tmp_path), reference, cases)


def test_four_ranks_equal_one_process(reference, tmp_path) -> None:
    _check(_spawn(4, ["fmfa"], tmp_path), reference, ["fmfa"])


def test_one_process_scope_is_local() -> None:
    assert batch_scope("global") is LOCAL  # no process group: nothing to gather
    assert batch_scope("local") is LOCAL
    with pytest.raises(ValueError, match="loss.gather"):
        batch_scope("everything")


def test_local_mean_weighs_items() -> None:
    total = torch.tensor(6.0)
    assert float(LOCAL.mean(total, 4)) == 1.5
    assert float(LOCAL.mean(total, 0)) == 6.0  # no item: the sum (0 in practice), never a NaN
