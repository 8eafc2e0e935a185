"""What the method files share: the base classes, batch-key lookup, per-sample draws, the MLM term."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from tpr_core import losses
from tpr_core.config import ExperimentConfig
from tpr_core.distributed import BatchScope
from tpr_core.models.dual_encoder import DualEncoder, build_dual_encoder, pool_eos
from tpr_core.models.heads import identity_classifier

if TYPE_CHECKING:  # pragma: no cover
    from tpr_core.models.registry import MethodSpec

Batch = dict[str, Tensor]


def need(batch: Batch, key: str, method: str, view: str | None = None) -> Tensor:
    """``batch[key]``; a missing key is an error naming the method and the view that builds it."""
    try:
        return batch[key]
    except KeyError:
        where = f" (view {view!r})" if view else ""
        raise KeyError(
            f"method {method!r} needs batch key {key!r}{where}; the batch has {sorted(batch)}"
        ) from None


def row_uniform(seeds: Tensor, n: int) -> Tensor:
    """(B, n) uniform draws on the CPU, row ``i`` from a generator seeded by ``seeds[i]``."""
    rows = []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        rows.append(torch.rand(n, generator=g))
    return torch.stack(rows)


def mlm_term(outputs: dict[str, Tensor], scope: BatchScope) -> Tensor:
    """MLM cross-entropy averaged over the masked tokens of the global batch."""
    count = int((outputs["mlm_labels"] != -100).sum())
    return scope.mean(losses.mlm(outputs["mlm_logits"], outputs["mlm_labels"]) * count, count)


class Method(nn.Module):
    """Base of every method module; ``spec`` is set by ``register_method``."""

    spec: ClassVar[MethodSpec]

    @classmethod
    def build(cls, cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> Method:
        """The module from the config; ``tokenizer.vocab_size`` includes the mask token."""
        return cls(cfg, num_classes, tokenizer)


class DualMethod(Method):
    """Shared parts of the dual-encoder methods: encoder, identity classifier, global features."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> None:
        super().__init__()
        self.encoder: DualEncoder = build_dual_encoder(cfg.model, int(tokenizer.vocab_size))
        self.classifier = identity_classifier(self.encoder.embed_dim, num_classes)
        self.temperature = float(cfg.loss.temperature)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) global image features (not normalised)."""
        return self.encoder.encode_image(images)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, E) global text features (not normalised)."""
        return self.encoder.encode_text(text_ids, text_mask)

    def _global(self, batch: Batch) -> dict[str, Tensor]:
        name = self.spec.name
        image_tokens = self.encoder.image_tokens(need(batch, "images", name))  # (B, 1 + N, E)
        text_tokens = self.encoder.text_tokens(need(batch, "text_ids", name))  # (B, L, E)
        text_mask = need(batch, "text_mask", name)
        return {
            "image_feats": image_tokens[:, 0],
            "text_feats": pool_eos(text_tokens, text_mask),
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
        }
