"""IVT (Shu et al. 2022): shared encoder; CMPM at the sentence, phrase and word levels, with
bidirectional mask modelling during training.

The recipe has one term, ``mla`` (multi-level alignment), and asks the data side for the
phrase and word texts (view ``levels``) and an image view per level (``level_images``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpr_core import losses
from tpr_core.config import ExperimentConfig
from tpr_core.distributed import LOCAL, BatchScope
from tpr_core.models.methods._common import Batch, Method, need
from tpr_core.models.registry import MethodSpec, register_method
from tpr_core.models.shared_encoder import SharedEncoder, build_shared_encoder


@register_method(MethodSpec("ivt", encoder="shared", terms={"mla": 1.0}, views=("levels", "level_images")))
class IVT(Method):
    """IVT: shared encoder, multi-level CMPM, bidirectional mask modelling.

    During training each forward draws a drop ratio uniformly in ``[0, loss.bmm_mask_ratio)``
    for the images and one for the texts (the same for the three levels), and drops
    that share of patch tokens and of word tokens (see ``shared_encoder``). Eval mode
    drops nothing. The ratios and the dropped tokens come from each rank's own RNG: with N
    workers each rank draws its own ratio for its share of the batch, so BMM (alone of all
    the methods' randomness) is the same in distribution but not draw for draw as one process.

    Multi-level alignment (``loss.mla_form``): ``joint`` (IVT's code) pairs the sentence,
    phrase and word embeddings each with its own augmented view of the image (batch view
    ``level_images``) and computes one CMPM over the 3B rows; ``separate`` pairs all three
    levels with the sentence's view and sums three CMPMs (the level views are then unused).
    """

    def __init__(self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> None:
        super().__init__()
        if cfg.model.pretrained_text is not None:
            from tpr_core.models.ivt_pretrained import check_bert_tokenizer

            check_bert_tokenizer(tokenizer, cfg.model.pretrained_text)  # BERT's ids, or an error
        self.encoder: SharedEncoder = build_shared_encoder(cfg.model, int(tokenizer.vocab_size))
        # IVT has no identity classifier: ``num_classes`` is accepted for the common builder signature.
        self.bmm_ratio = float(cfg.loss.bmm_mask_ratio)
        self.mla_form = cfg.loss.mla_form
        self.label_norm = cfg.loss.cmpm_label_norm

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) (no dropping)."""
        return self.encoder.encode_image(images)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, E) (no dropping)."""
        return self.encoder.encode_text(text_ids, text_mask)

    def _ratio(self) -> float:
        if not self.training or self.bmm_ratio <= 0:
            return 0.0
        return float(torch.rand(()).item()) * self.bmm_ratio

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Image features and text features at three levels.

        Returns:
            ``image_feats``, ``text_feats`` (sentence), ``phrase_feats``, ``word_feats``, all (B, E);
            with ``mla_form: joint`` also ``phrase_image_feats`` and ``word_image_feats`` (B, E),
            the embeddings of the phrase and word levels' image views.
        """
        name = self.spec.name
        images = need(batch, "images", name)
        b = images.shape[0]
        out: dict[str, Tensor] = {}
        if self.mla_form == "joint":
            views = [images] + [need(batch, k, name, "level_images") for k in ("phrase_images", "word_images")]
            # One pass for the three views, one BMM draw for all (as the authors' concatenation).
            image_feats, out["phrase_image_feats"], out["word_image_feats"] = self.encoder.encode_image(
                torch.cat(views), self._ratio()
            ).split(b)  # 3 x (B, E)
        else:
            image_feats = self.encoder.encode_image(images, self._ratio())
        levels = [
            ("text_ids", "text_mask", None),
            ("phrase_ids", "phrase_mask", "levels"),
            ("word_ids", "word_mask", "levels"),
        ]
        ids = [need(batch, i, name, v) for i, _, v in levels]
        masks = [need(batch, m, name, v) for _, m, v in levels]
        # One pass for the three levels (they share length and encoder).
        feats = self.encoder.encode_text(torch.cat(ids), torch.cat(masks), self._ratio())  # (3B, E)
        text_feats, phrase_feats, word_feats = feats.split(b)
        out.update(image_feats=image_feats, text_feats=text_feats, phrase_feats=phrase_feats, word_feats=word_feats)
        return out

    def loss_terms(self, outputs: dict[str, Tensor], batch: Batch, scope: BatchScope = LOCAL) -> dict[str, Tensor]:
        """``mla`` (unweighted): CMPM over the sentence, phrase and word levels (``loss.mla_form``)."""
        pids = scope(need(batch, "pids", self.spec.name))
        text_keys = ("text_feats", "phrase_feats", "word_feats")
        image_keys = ("image_feats", "phrase_image_feats", "word_image_feats") if self.mla_form == "joint" else ("image_feats",)
        gathered = scope.many(*(outputs[k] for k in text_keys + image_keys))
        texts, images = list(gathered[:3]), list(gathered[3:])
        if len(images) == 1:  # separate: every level against the sentence's image view
            images = images * 3
        return {"mla": losses.mla(images, texts, pids, form=self.mla_form, label_norm=self.label_norm)}
