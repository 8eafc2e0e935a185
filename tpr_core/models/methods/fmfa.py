"""FMFA (Yin et al. 2025): IRRA with adaptive SDM in place of SDM, plus explicit fine-grained
alignment (EFA) between patch tokens and word tokens.

The recipe keeps IRRA's terms (A-SDM for SDM) and adds EFA, all weighed 1.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tpr_core import losses
from tpr_core.config import ExperimentConfig
from tpr_core.distributed import LOCAL, BatchScope
from tpr_core.models.methods._common import Batch, mlm_term, need
from tpr_core.models.methods.irra import IRRA
from tpr_core.models.registry import MethodSpec, register_method


@register_method(
    MethodSpec("fmfa", encoder="dual", terms={"a_sdm": 1.0, "efa": 1.0, "mlm": 1.0, "id": 1.0}, views=("mlm",))
)
class FMFA(IRRA):
    """FMFA: IRRA with adaptive SDM, plus explicit fine-grained alignment."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> None:
        super().__init__(cfg, num_classes, tokenizer)
        self.alpha = float(cfg.loss.a_sdm_alpha)
        self.a_sdm_form = cfg.loss.a_sdm_form
        self.efa_form = cfg.loss.efa_form
        self.margin_text = cfg.loss.efa_margin_text  # None: the form's own margin
        self.margin_image = cfg.loss.efa_margin_image

    def loss_terms(self, outputs: dict[str, Tensor], batch: Batch, scope: BatchScope = LOCAL) -> dict[str, Tensor]:
        """``a_sdm``, ``efa``, ``mlm``, ``id`` (unweighted).

        EFA aligns the patch tokens (class token left out: it is the global feature A-SDM
        already aligns) with the caption tokens; which text positions take part is the form's
        choice (see ``losses.efa``). Its pair scores compare every pair of the global batch:
        ``losses.efa`` gathers the joint embeddings and the score rows through ``scope``.
        """
        pids = need(batch, "pids", self.spec.name)
        v, t = outputs["image_feats"], outputs["text_feats"]
        return {
            "a_sdm": losses.a_sdm(
                *scope.many(v, t), scope(pids), temperature=self.temperature, alpha=self.alpha, form=self.a_sdm_form
            ),
            "efa": losses.efa(
                outputs["image_tokens"][:, 1:],
                outputs["text_tokens"],
                need(batch, "text_mask", self.spec.name),
                margin_text=self.margin_text,
                margin_image=self.margin_image,
                pids=pids,
                form=self.efa_form,
                scope=scope,  # gathers the joint embeddings and the pair-score rows itself
            ),
            "mlm": mlm_term(outputs, scope),
            "id": losses.id_loss(self.classifier, v, t, pids),
        }
