import math

import pytest
from torch import nn

from tpr_core.config import OptimConfig
from tpr_core.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class _M(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def test_param_groups_lrs_and_decay():
    cfg = OptimConfig(lr=1e-3, head_lr_factor=5.0, bias_lr_factor=2.0, weight_decay=0.1)
    m = _M()
    groups = {g["name"]: g for g in param_groups(m, cfg)}
    assert groups["encoder/decay"]["lr"] == pytest.approx(1e-3)
    assert groups["encoder/decay"]["weight_decay"] == 0.1
    assert groups["encoder/bias"]["lr"] == pytest.approx(2e-3) and groups["encoder/bias"]["weight_decay"] == 0
    # the LayerNorm weight is 1-D: no decay, base LR
    assert groups["encoder/no_decay"]["weight_decay"] == 0 and groups["encoder/no_decay"]["lr"] == pytest.approx(1e-3)
    assert groups["head/decay"]["lr"] == pytest.approx(5e-3)
    assert groups["head/bias"]["lr"] == pytest.approx(1e-2)
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.1, 0.0) == pytest.approx(0.1)
    assert lr_factor(5, 100, 10, 0.1, 0.0) == pytest.approx(0.55)
    assert lr_factor(10, 100, 10, 0.1, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1, 0.2) == pytest.approx(0.2)
    assert lr_factor(32, 100, 10, 0.1, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_scheduler_scales_every_group_from_its_own_base():
    cfg = OptimConfig(lr=1e-3, head_lr_factor=5.0, warmup_epochs=1, warmup_factor=0.1)
    opt = build_optimizer(_M(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, epochs=5)
    base = [g["initial_lr"] for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.1 for b in base])
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(base)
