"""IRRA (Jiang & Ye, CVPR 2023): dual encoder; SDM + identity + implicit relation reasoning (MLM).

The recipe weighs sdm, id and mlm equally, as the paper.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tpr_core import losses
from tpr_core.config import ExperimentConfig
from tpr_core.distributed import LOCAL, BatchScope
from tpr_core.models.heads import IRRHead
from tpr_core.models.methods._common import Batch, DualMethod, mlm_term, need
from tpr_core.models.registry import MethodSpec, register_method


@register_method(MethodSpec("irra", encoder="dual", terms={"sdm": 1.0, "id": 1.0, "mlm": 1.0}, views=("mlm",)))
class IRRA(DualMethod):
    """IRRA: SDM, identity loss, implicit relation reasoning."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> None:
        super().__init__(cfg, num_classes, tokenizer)
        self.irr = IRRHead(self.encoder.embed_dim, cfg.model.cross_depth, int(tokenizer.vocab_size))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Global features, token features and masked-token scores.

        Returns:
            ``image_feats`` (B, E), ``text_feats`` (B, E), ``image_tokens`` (B, 1 + N, E),
            ``text_tokens`` (B, L, E), ``mlm_logits`` (1, M, V) and ``mlm_labels`` (1, M)
            at the M masked positions.
        """
        out = self._global(batch)
        mlm_ids = need(batch, "mlm_ids", self.spec.name, "mlm")
        labels = need(batch, "mlm_labels", self.spec.name, "mlm")
        # The masked caption goes through the same text encoder (IRRA shares it).
        mlm_tokens = self.encoder.text_tokens(mlm_ids)  # (B, L, E)
        out["mlm_logits"], out["mlm_labels"] = self.irr(mlm_tokens, out["image_tokens"], labels)
        return out

    def loss_terms(self, outputs: dict[str, Tensor], batch: Batch, scope: BatchScope = LOCAL) -> dict[str, Tensor]:
        """``sdm``, ``id``, ``mlm`` (unweighted)."""
        pids = need(batch, "pids", self.spec.name)
        v, t = outputs["image_feats"], outputs["text_feats"]
        return {
            "sdm": losses.sdm(*scope.many(v, t), scope(pids), temperature=self.temperature),
            "id": losses.id_loss(self.classifier, v, t, pids),
            "mlm": mlm_term(outputs, scope),
        }
