"""Optimizer groups and LR schedules against the authors' rules, written out here.

IRRA / UIT (solver/build.py): 5x for "cross" modules, then biases 2x without decay, then
5x for classifier / mlm_head (biases keep no decay); Adam eps 1e-3. Scheduler
(solver/lr_scheduler.py, stepped once per epoch, last_epoch 0 in the first epoch):
e < 5: 0.1 (1 - e/5) + e/5; else 0.5 (1 + cos(pi (e - 5) / (60 - 5))).
IVT (solver/scheduler_factory.py, cosine_lr.py; scheduler.step(epoch) before each epoch):
t < 5: 0.01 B + t (lr_g - 0.01 B) / 5; else 0.002 B + 0.5 (lr_g - 0.002 B)(1 + cos(pi t / 120)),
B the base lr, lr_g the group's lr; t = epoch + 1 on CUHK-PEDES, t = epoch on ICFG / RSTPReid.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.tpr_core.test_models import Tok
from tpr_core.config import ExperimentConfig, OptimConfig
from tpr_core.experiment import load_config
from tpr_core.models import build_method
from tpr_core.optim import build_optimizer, build_scheduler, epoch_factor, lr_factor, param_groups

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
EPOCHS_CHECKED = (0, 4, 5, 30, 59)
SPE = 3  # optimizer steps per epoch in the schedule tests




_MODELS: dict[str, nn.Module] = {}


def _model(method: str) -> nn.Module:
    if method not in _MODELS:
        torch.manual_seed(0)
        cfg = ExperimentConfig(
            method=method,
            model={"preset": "tiny", "image_size": (32, 16), "patch_size": 8, "text_length": 16, "cross_depth": 1,
                   "restore_depth": 1},
        )
        _MODELS[method] = build_method(cfg, 5, Tok())
    return _MODELS[method]


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def _base(name: str) -> OptimConfig:
    return load_config(CONFIGS / f"{name}_base.yaml", ["model.pretrained=null"]).optim


# --------------------------------------------------------------------------- the authors' rules


def irra_rule(name: str, lr: float, wd: float) -> tuple[float, float]:
    """IRRA's / SEN's build_optimizer on tpr's names ("cross" -> tpr's cross-modal modules)."""
    cross = name.startswith(("irr.cross_attn.", "irr.transformer.", "restorer.cross_attn.", "restorer.transformer."))
    p_lr, p_wd = lr, wd
    if cross:
        p_lr = lr * 5.0
    if "bias" in name.rsplit(".", 1)[-1]:
        p_lr, p_wd = lr * 2.0, 0.0
    if name.startswith(("classifier.", "irr.mlm_head.")):
        p_lr = lr * 5.0
    return p_lr, p_wd


def irra_epoch_factor(e: int) -> float:
    if e < 5:
        return 0.1 * (1 - e / 5) + e / 5
    return 0.5 * (1 + math.cos(math.pi * (e - 5) / 55))


def ivt_lr(t: int, group_lr: float, base: float) -> float:
    init, floor = 0.01 * base, 0.002 * base
    if t < 5:
        return init + t * (group_lr - init) / 5
    return floor + 0.5 * (group_lr - floor) * (1 + math.cos(math.pi * min(t, 120) / 120))


def _lrs_at_epoch(cfg: OptimConfig, model: nn.Module, epochs: int, epoch: int) -> tuple[list[dict], list[float]]:
    """Group dicts and their LRs in the middle of ``epoch`` (DeepSpeed steps the scheduler per step)."""
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, SPE, epochs)
    for _ in range(epoch * SPE + 1):  # parameters have no gradients: step() moves nothing
        opt.step()
        sched.step()
    return opt.param_groups, [g["lr"] for g in opt.param_groups]


# --------------------------------------------------------------------------- groups


def test_irra_groups_follow_irras_code_on_a_real_model():
    model, cfg = _model("irra"), OptimConfig()  # the schema defaults are IRRA's
    where = {id(p): g for g in param_groups(model, cfg) for p in g["params"]}
    assert len(where) == sum(1 for _ in model.parameters())
    for name, p in model.named_parameters():
        g = where[id(p)]
        assert (g["lr"], g["weight_decay"]) == pytest.approx(irra_rule(name, 1e-5, 4e-5)), name
    group_of = {n: where[id(p)]["name"] for n, p in model.named_parameters()}
    assert group_of["irr.cross_attn.in_proj_weight"] == "head/decay"
    assert group_of["irr.transformer.layers.0.layer_norm1.weight"] == "head/decay"
    assert group_of["irr.cross_attn.in_proj_bias"] == "head/bias"  # 2x, not 10x
    assert group_of["irr.mlm_head.0.bias"] == group_of["classifier.bias"] == "head/bias_head_lr"
    assert group_of["classifier.weight"] == group_of["irr.mlm_head.3.weight"] == "head/decay"
    # ln_pre_t / ln_pre_i / ln_post have no "cross" in IRRA's names: base LR, decayed
    assert group_of["irr.ln_pre_t.weight"] == group_of["irr.ln_post.weight"] == "base/decay"
    assert group_of["irr.ln_pre_i.bias"] == "base/bias"
    # 1-D encoder parameters are decayed as in IRRA (only biases are exempt)
    assert group_of["encoder.vision_model.embeddings.class_embedding"] == "base/decay"
    assert group_of["encoder.vision_model.pre_layrnorm.weight"] == "base/decay"
    assert group_of["encoder.visual_projection.weight"] == "base/decay"
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert list(groups)[0] == "base/decay"  # train/lr logs group 0: the base LR
    expect = {"base/decay": (1e-5, 4e-5), "base/bias": (2e-5, 0.0), "head/decay": (5e-5, 4e-5),
              "head/bias": (2e-5, 0.0), "head/bias_head_lr": (5e-5, 0.0)}
    _same({k: (g["lr"], g["weight_decay"]) for k, g in groups.items()}, expect)


def test_irra_base_configs_equal_the_schema_defaults_in_groups():
    model, default = _model("irra"), param_groups(_model("irra"), OptimConfig())
    for ds in ("cuhk", "icfg", "rstp"):
        got = param_groups(model, _base(f"irra_{ds}"))
        assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in got] == [
            (g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in default
        ]


def test_uit_groups_follow_sens_code():
    model = _model("uit")
    for ds in ("cuhk", "icfg", "rstp"):
        cfg = _base(f"uit_{ds}")
        where = {id(p): g for g in param_groups(model, cfg) for p in g["params"]}
        for name, p in model.named_parameters():
            g = where[id(p)]
            assert (g["lr"], g["weight_decay"]) == pytest.approx(irra_rule(name, 1e-5, 4e-5)), name
    lr = {n: where[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lr["restorer.cross_attn.in_proj_weight"] == pytest.approx(5e-5)
    assert lr["restorer.transformer.layers.0.mlp.fc1.weight"] == pytest.approx(5e-5)
    assert lr["restorer.embed.weight"] == lr["restorer.pred.weight"] == lr["restorer.mask_token"] == pytest.approx(1e-5)
    assert lr["restorer.norm.weight"] == pytest.approx(1e-5) and lr["restorer.pred.bias"] == pytest.approx(2e-5)


def test_fmfa_one_lr_and_decay_for_everything():
    model = _model("fmfa")
    for ds in ("cuhk", "icfg", "rstp"):
        groups = param_groups(model, _base(f"fmfa_{ds}"))
        assert {(g["lr"], g["weight_decay"]) for g in groups} == {(5e-6, 4e-5)}
        assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())


def test_ivt_groups_biases_2x_and_decayed():
    model = _model("ivt")
    groups = {g["name"]: g for g in param_groups(model, _base("ivt_cuhk"))}
    assert set(groups) == {"base/decay", "base/bias"}
    assert (groups["base/decay"]["lr"], groups["base/decay"]["weight_decay"]) == pytest.approx((5e-3, 1e-4))
    assert (groups["base/bias"]["lr"], groups["base/bias"]["weight_decay"]) == pytest.approx((1e-2, 1e-4))
    n_bias = sum(1 for n, _ in model.named_parameters() if "bias" in n.rsplit(".", 1)[-1])
    assert len(groups["base/bias"]["params"]) == n_bias > 0


def _old_groups(model: nn.Module, cfg: OptimConfig) -> dict[str, tuple[float, float, int]]:
    """tpr's rule before the authors' settings: everything outside encoder. a head, product for head biases."""
    out: dict[str, list] = {}
    for name, p in model.named_parameters():
        head = not name.startswith("encoder.")
        kind = "bias" if name.endswith(".bias") else ("no_decay" if p.ndim <= 1 else "decay")
        lr = cfg.lr * (cfg.head_lr_factor if head else 1.0) * (cfg.bias_lr_factor if kind == "bias" else 1.0)
        wd = cfg.weight_decay if kind == "decay" else 0.0
        out.setdefault(f"{'head' if head else 'base'}/{kind}", [lr, wd, 0])[2] += 1
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("method", ["irra", "fmfa", "uit", "ivt"])
def test_tiny_configs_keep_the_earlier_optimizer(method):
    cfg = load_config(CONFIGS / f"{method}_synthetic_tiny.yaml").optim
    model = _model(method)
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW and opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.999)
    got = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups}
    _same(got, _old_groups(model, cfg))
    # per-step warm-up + cosine as before (tpr's earlier lr_factor)
    sched = build_scheduler(opt, cfg, 10, 8)
    for step in range(80):
        want = lr_factor(step, 80, 10, 0.1, 0.0)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["initial_lr"] * want for g in opt.param_groups])
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- optimizers


def test_optimizer_classes_and_hyperparameters():
    model = _model("irra")
    adam = build_optimizer(model, _base("irra_cuhk"))
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["eps"] == 1e-3 and adam.defaults["betas"] == (0.9, 0.999)
    assert adam.defaults["weight_decay"] == 0 and not adam.defaults["amsgrad"]
    fmfa = build_optimizer(_model("fmfa"), _base("fmfa_rstp"))
    assert type(fmfa) is torch.optim.Adam and fmfa.defaults["eps"] == 1e-3
    sgd = build_optimizer(_model("ivt"), _base("ivt_icfg"))
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["dampening"] == 0 and not sgd.defaults["nesterov"]
    assert all(g["momentum"] == 0.9 for g in sgd.param_groups)
    adamw = build_optimizer(model, OptimConfig(name="adamw", eps=1e-8, betas=(0.8, 0.99)))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["eps"] == 1e-8 and adamw.defaults["betas"] == (0.8, 0.99)
    # the weight decay lives on the groups (Adam/SGD: L2 in the gradient, as the authors')
    assert {g["name"]: g["weight_decay"] for g in adam.param_groups}["base/decay"] == 4e-5


def test_sgd_step_is_torchs_sgd_with_per_group_lr_and_decay():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2))
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.5, weight_decay=0.01, bias_weight_decay=0.02, head_modules=[])
    opt = build_optimizer(m, cfg)
    w0, b0 = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    m[0].weight.grad = torch.ones_like(w0)
    m[0].bias.grad = torch.ones_like(b0)
    opt.step()
    assert torch.allclose(m[0].weight, w0 - 0.1 * (1 + 0.01 * w0))
    assert torch.allclose(m[0].bias, b0 - 0.2 * (1 + 0.02 * b0))


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", ["irra_cuhk", "uit_icfg", "fmfa_rstp"])
@pytest.mark.parametrize("epoch", EPOCHS_CHECKED)
def test_irra_scheduler_every_group(name, epoch):
    cfg = _base(name)
    method = name.split("_")[0]
    groups, lrs = _lrs_at_epoch(cfg, _model(method), 60, epoch)
    f = irra_epoch_factor(epoch)
    assert lrs == pytest.approx([g["initial_lr"] * f for g in groups], rel=1e-9, abs=0)
    base = {"irra": 1e-5, "uit": 1e-5, "fmfa": 5e-6}[method]
    assert min(g["initial_lr"] for g in groups) == pytest.approx(base)


def test_irra_schedule_values():
    assert [round(irra_epoch_factor(e), 6) for e in (0, 1, 4, 5)] == [0.1, 0.28, 0.82, 1.0]
    assert irra_epoch_factor(59) > 0  # 0 would be epoch 60, never trained
    for e in range(60):
        assert epoch_factor(e, 60, 5, 0.1, 0.0) == pytest.approx(irra_epoch_factor(e))


@pytest.mark.parametrize("ds,offset,epochs", [("cuhk", 1, 120), ("icfg", 0, 121), ("rstp", 0, 121)])
@pytest.mark.parametrize("epoch", EPOCHS_CHECKED)
def test_ivt_scheduler_every_group(ds, offset, epochs, epoch):
    cfg = load_config(CONFIGS / f"ivt_{ds}_base.yaml", ["model.pretrained=null"])
    assert cfg.train.epochs == epochs
    groups, lrs = _lrs_at_epoch(cfg.optim, _model("ivt"), cfg.train.epochs, epoch)
    assert {g["name"] for g in groups} == {"base/decay", "base/bias"}
    want = [ivt_lr(epoch + offset, g["initial_lr"], 5e-3) for g in groups]
    assert lrs == pytest.approx(want, rel=1e-9, abs=0)


def test_ivt_schedule_ends():
    cuhk = load_config(CONFIGS / "ivt_cuhk_base.yaml", ["model.pretrained=null"])
    icfg = load_config(CONFIGS / "ivt_icfg_base.yaml", ["model.pretrained=null"])
    for cfg, first in ((cuhk, 0.01 + 0.99 / 5), (icfg, 0.01)):
        model = _model("ivt")
        e_last = cfg.train.epochs - 1
        groups, lrs = _lrs_at_epoch(cfg.optim, model, cfg.train.epochs, 0)
        assert dict(zip([g["name"] for g in groups], lrs, strict=True))["base/decay"] == pytest.approx(first * 5e-3)
        groups, lrs = _lrs_at_epoch(cfg.optim, model, cfg.train.epochs, e_last)
        assert lrs == pytest.approx([0.002 * 5e-3] * len(groups))  # every group ends at 0.002 x base lr


def test_epoch_unit_is_constant_within_an_epoch_and_step_unit_is_not():
    model = nn.Linear(2, 2)
    for unit in ("epoch", "step"):
        cfg = OptimConfig(schedule_unit=unit, head_modules=[])
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, 4, 10)
        seen = []
        for _ in range(4 * 10):
            seen.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])
            opt.step()
            sched.step()
        if unit == "epoch":
            for e in range(10):
                assert seen[4 * e: 4 * e + 4] == pytest.approx([epoch_factor(e, 10, 5, 0.1, 0.0)] * 4)
        else:
            assert seen == pytest.approx([lr_factor(s, 40, 20, 0.1, 0.0) for s in range(40)])
            assert len(set(seen[:4])) == 4


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.1, 0.0) == pytest.approx(0.1)
    assert lr_factor(5, 100, 10, 0.1, 0.0) == pytest.approx(0.55)
    assert lr_factor(10, 100, 10, 0.1, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1, 0.2) == pytest.approx(0.2)
    assert lr_factor(32, 100, 10, 0.1, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_config_rejects_unknown_optimizer_and_empty_prefix():
    with pytest.raises(ValueError):
        OptimConfig(name="lamb")
    with pytest.raises(ValueError):
        OptimConfig(head_modules=[""])
    assert OptimConfig(head_modules=["irr.mlm_head."]).head_modules == ["irr.mlm_head"]
