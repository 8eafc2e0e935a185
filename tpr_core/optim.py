"""Optimizer parameter groups and learning-rate schedule, as in IRRA.

IRRA trains the CLIP backbone at the base LR and the randomly initialised heads
(cross-modal transformer, MLM head, classifier) at ``lr x head_lr_factor`` (5x);
biases get ``bias_lr_factor`` (2x) and no weight decay; norms get no weight decay.
The schedule is a linear warm-up from ``warmup_factor`` to 1 over ``warmup_epochs``,
then a cosine decay to ``min_lr_factor``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tpr_core.config import OptimConfig


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales, embeddings' 1-D params (class token, logit scale) are not decayed.
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: (encoder | head) x (decay | no decay | bias), each with its own LR.

    The backbone is ``model.encoder`` (see ``tpr_core.models``); everything else is a head.
    Every group carries ``initial_lr`` so the schedule scales each from its own base.
    """
    buckets: dict[tuple[bool, str], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = not name.startswith("encoder.")
        kind = "bias" if name.endswith(".bias") else ("no_decay" if _is_no_decay(name, p) else "decay")
        buckets.setdefault((head, kind), []).append(p)
    groups = []
    for (head, kind), params in sorted(buckets.items()):
        lr = cfg.lr * (cfg.head_lr_factor if head else 1.0)
        if kind == "bias":
            lr *= cfg.bias_lr_factor
        wd = cfg.weight_decay if kind == "decay" else 0.0
        groups.append(
            {"params": params, "lr": lr, "initial_lr": lr, "weight_decay": wd, "name": f"{'head' if head else 'encoder'}/{kind}"}
        )
    return groups


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float, min_factor: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1 - alpha) + alpha
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.warmup_factor, cfg.min_lr_factor)
    )
