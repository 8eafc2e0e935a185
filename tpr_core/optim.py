"""Optimizer parameter groups and learning-rate schedule, as in the authors' code.

Parameter groups (``param_groups``), each parameter by its name in the method module:

- weights (non-biases) get ``lr x head_lr_factor`` inside ``head_modules`` and ``lr``
  elsewhere, with ``weight_decay`` (1-D ones get none when ``decay_1d_params`` is false);
- ``bias_rule: authors``: a bias is a parameter whose last name part contains ``bias``
  (``fc.bias``, ``cross_attn.in_proj_bias``), as the authors' ``"bias" in key``; it gets
  ``lr x head_lr_factor`` inside ``head_bias_modules``, else ``lr x bias_lr_factor``;
- ``bias_rule: stacked`` (tpr's earlier rule): only names ending in ``.bias`` are biases,
  at their module's LR times ``bias_lr_factor``;
- biases get ``bias_weight_decay``.

IRRA (``solver/build.py``) gives 5x to names containing ``cross`` (cross-attention and
cross-modal transformer), then 2x and no decay to biases, then 5x to ``classifier`` and
``mlm_head`` (biases included, still without decay); its three layernorms around the
cross-modal transformer (``ln_pre_t``, ``ln_pre_i``, ``ln_post``) stay at 1x. The
defaults of ``OptimConfig`` say the same in tpr's module names.

Schedule (``epoch_factor``): with t the schedule epoch (tpr's 0-based epoch plus
``epoch_offset``; fractional in ``schedule_unit: step``), W ``warmup_epochs`` and T
``cosine_epochs`` (default: the training epochs),

- t < W: ``warmup_factor + (1 - warmup_factor) * t / W`` (linear warm-up);
- else: ``min_lr_factor + (1 - min_lr_factor) * (1 + cos(pi * p)) / 2``, with
  p = (t - W) / (T - W) if ``warmup_prefix`` (IRRA's ``LRSchedulerWithWarmup``) else t / T
  (timm's ``CosineLRScheduler``, IVT), p capped at 1.

With ``schedule_anchor: base`` the warm-up start and the floor are fractions of ``optim.lr``
for every group (IVT's ``warmup_lr_init`` and ``lr_min``), so a group at r x lr goes from
``warmup_factor / r`` of its own LR instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from tpr_core.config import OptimConfig

_KIND_ORDER = ("decay", "no_decay", "bias", "bias_head_lr")


def is_bias(name: str, rule: str = "authors") -> bool:
    """A bias as the authors' code sees one (``"bias" in key``, on the last name part), or,
    with ``rule="stacked"``, a name ending in ``.bias``."""
    if rule == "stacked":
        return name.endswith(".bias")
    return "bias" in name.rsplit(".", 1)[-1]


def in_modules(name: str, prefixes: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or lies under one (``irr.transformer`` ...)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_group_of(name: str, param: nn.Parameter, cfg: OptimConfig) -> tuple[str, float, float]:
    """``(group name, LR multiplier of cfg.lr, weight decay)`` of one named parameter."""
    head = in_modules(name, cfg.head_modules)
    scope = "head" if head else "base"
    if is_bias(name, cfg.bias_rule):
        if cfg.bias_rule == "stacked":
            return f"{scope}/bias", cfg.bias_lr_factor * (cfg.head_lr_factor if head else 1.0), cfg.bias_weight_decay
        if in_modules(name, cfg.head_bias_modules):
            return f"{scope}/bias_head_lr", cfg.head_lr_factor, cfg.bias_weight_decay
        return f"{scope}/bias", cfg.bias_lr_factor, cfg.bias_weight_decay
    mult = cfg.head_lr_factor if head else 1.0
    if param.ndim <= 1 and not cfg.decay_1d_params:
        return f"{scope}/no_decay", mult, 0.0
    return f"{scope}/decay", mult, cfg.weight_decay


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Optimizer groups of ``model``'s trainable parameters (see the module docstring).

    Each group has ``name``, ``lr``, ``initial_lr`` (the schedule scales each group from it),
    ``lr_mult`` (``lr / cfg.lr``) and ``weight_decay``; empty groups are left out. The first
    group is ``base/decay`` when present, so ``scheduler.get_last_lr()[0]`` is the base LR.
    """
    buckets: dict[str, tuple[float, float, list[nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group, mult, wd = param_group_of(name, p, cfg)
        buckets.setdefault(group, (mult, wd, []))[2].append(p)

    def order(group: str) -> tuple[int, int]:
        scope, kind = group.split("/")
        return (0 if scope == "base" else 1, _KIND_ORDER.index(kind))

    groups = []
    for group in sorted(buckets, key=order):
        mult, wd, params = buckets[group]
        lr = cfg.lr * mult
        groups.append(
            {"params": params, "lr": lr, "initial_lr": lr, "lr_mult": mult, "weight_decay": wd, "name": group}
        )
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg.name`` over ``param_groups(model, cfg)``: Adam / AdamW (betas, eps) or SGD (momentum)."""
    groups = param_groups(model, cfg)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"optim.name {cfg.name!r} is not one of adam, adamw, sgd")


def epoch_factor(
    t: float,
    total: float,
    warmup: float,
    warmup_factor: float,
    min_factor: float,
    *,
    warmup_prefix: bool = True,
    base_ratio: float = 1.0,
) -> float:
    """LR multiplier of a group at schedule time ``t`` (in epochs, or any one unit).

    Args:
        t: schedule time (epoch index plus offset; fractional for per-step schedules).
        total: cosine length T (the factor is ``min_factor``-anchored from t >= T on).
        warmup: warm-up length W (0: none).
        warmup_factor, min_factor: start of warm-up and cosine floor.
        warmup_prefix: cosine over (t - W) / (T - W) if true, over t / T otherwise.
        base_ratio: ``optim.lr / group LR`` when the warm-up start and the floor are
            fractions of ``optim.lr`` (``schedule_anchor: base``); 1 for per-group.
    """
    start, floor = warmup_factor * base_ratio, min_factor * base_ratio
    if warmup > 0 and t < warmup:
        alpha = t / warmup
        return start * (1 - alpha) + alpha
    if warmup_prefix:
        span = total - warmup
        progress = 1.0 if span <= 0 else (t - warmup) / span
    else:
        progress = t / total
    progress = min(1.0, max(0.0, progress))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float, min_factor: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of a per-step warm-up + cosine."""
    return epoch_factor(step, total_steps, warmup_steps, warmup_factor, min_factor)


def schedule_lambdas(
    cfg: OptimConfig, steps_per_epoch: int, epochs: int, lr_mults: Iterable[float]
) -> list[Callable[[int], float]]:
    """One ``step -> factor`` function per group (``lr_mults``: each group's ``lr / cfg.lr``).

    ``schedule_unit: epoch``: the factor is constant within an epoch and equals
    ``epoch_factor`` of that epoch (``step // steps_per_epoch + epoch_offset``). ``step``:
    the same curve in optimizer steps (warm-up ``round(warmup_epochs * steps_per_epoch)``
    steps), i.e. tpr's earlier per-step schedule.
    """
    spe = max(1, int(steps_per_epoch))
    cosine = cfg.cosine_epochs or epochs
    if cfg.schedule_unit == "epoch":
        unit = 1
        warmup: float = cfg.warmup_epochs
        total: float = cosine
        offset = cfg.epoch_offset
    else:
        unit = spe
        warmup = int(round(cfg.warmup_epochs * spe))
        total = max(1, cosine * spe)
        offset = cfg.epoch_offset * spe

    def make(mult: float) -> Callable[[int], float]:
        ratio = 1.0 / mult if cfg.schedule_anchor == "base" else 1.0

        def f(step: int) -> float:
            t = step // spe if unit == 1 else step
            return epoch_factor(
                t + offset, total, warmup, cfg.warmup_factor, cfg.min_lr_factor,
                warmup_prefix=cfg.warmup_prefix, base_ratio=ratio,
            )

        return f

    return [make(m) for m in lr_mults]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (DeepSpeed steps it after each ``engine.step``)."""
    mults = [g.get("lr_mult", g.get("initial_lr", g["lr"]) / cfg.lr) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambdas(cfg, steps_per_epoch, epochs, mults))
