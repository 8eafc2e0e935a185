"""The four retrieval methods as modules, registered by name.

Each module follows the interface of ``tpr_core.models``: ``encoder`` (the backbone) plus
heads, ``forward(batch) -> dict``, ``loss_terms(outputs, batch, scope) -> dict`` with exactly
the terms of its spec (unweighted), ``encode_image`` and ``encode_text``.

``scope`` (:mod:`tpr_core.distributed`) is what the batch-level terms see: each method passes
through it every tensor that a term compares across samples (global features, pids, EFA's
tokens), so that N workers compute the terms of one process on the global batch; per-sample
terms (ID, MLM, restoration) use the local rows, with ``scope.mean`` for token- or patch-level
means.

- ``irra``: dual encoder; SDM + identity + implicit relation reasoning (MLM).
- ``fmfa``: as irra with adaptive SDM in place of SDM, plus explicit fine-grained alignment
  between patch tokens and word tokens.
- ``uit``: dual encoder; SDM + identity + hardest-negative triplet + text-guided restoration
  of a greyscale, 70 %-masked copy of the image.
- ``ivt``: shared encoder; CMPM at the sentence, phrase and word levels, with bidirectional
  mask modelling during training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tpr_core import losses
from tpr_core.config import ExperimentConfig
from tpr_core.distributed import LOCAL, BatchScope
from tpr_core.models.dual_encoder import DualEncoder, build_dual_encoder, pool_eos
from tpr_core.models.heads import (
    IRRHead,
    RestorationHead,
    identity_classifier,
    patchify,
    random_keep,
    to_greyscale,
)
from tpr_core.models.registry import register_method
from tpr_core.models.shared_encoder import SharedEncoder, build_shared_encoder

__all__ = ["FMFA", "IRRA", "IVT", "UIT"]

Batch = dict[str, Tensor]


def _get(batch: Batch, key: str, method: str, view: str | None = None) -> Tensor:
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


def _mlm(outputs: dict[str, Tensor], scope: BatchScope) -> Tensor:
    """MLM cross-entropy averaged over the masked tokens of the global batch."""
    count = int((outputs["mlm_labels"] != -100).sum())
    return scope.mean(losses.mlm(outputs["mlm_logits"], outputs["mlm_labels"]) * count, count)


class _DualMethod(nn.Module):
    """Shared parts of the dual-encoder methods: encoder, identity classifier, global features."""

    name = ""

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
        image_tokens = self.encoder.image_tokens(_get(batch, "images", self.name))  # (B, 1 + N, E)
        text_tokens = self.encoder.text_tokens(_get(batch, "text_ids", self.name))  # (B, L, E)
        text_mask = _get(batch, "text_mask", self.name)
        return {
            "image_feats": image_tokens[:, 0],
            "text_feats": pool_eos(text_tokens, text_mask),
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
        }


class IRRA(_DualMethod):
    """IRRA (Jiang & Ye, CVPR 2023): SDM, identity loss, implicit relation reasoning."""

    name = "irra"

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
        mlm_ids = _get(batch, "mlm_ids", self.name, "mlm")
        labels = _get(batch, "mlm_labels", self.name, "mlm")
        # The masked caption goes through the same text encoder (IRRA shares it).
        mlm_tokens = self.encoder.text_tokens(mlm_ids)  # (B, L, E)
        out["mlm_logits"], out["mlm_labels"] = self.irr(mlm_tokens, out["image_tokens"], labels)
        return out

    def loss_terms(self, outputs: dict[str, Tensor], batch: Batch, scope: BatchScope = LOCAL) -> dict[str, Tensor]:
        """``sdm``, ``id``, ``mlm`` (unweighted)."""
        pids = _get(batch, "pids", self.name)
        v, t = outputs["image_feats"], outputs["text_feats"]
        return {
            "sdm": losses.sdm(*scope.many(v, t), scope(pids), temperature=self.temperature),
            "id": losses.id_loss(self.classifier, v, t, pids),
            "mlm": _mlm(outputs, scope),
        }


class FMFA(IRRA):
    """FMFA (Yin et al. 2025): IRRA with adaptive SDM, plus explicit fine-grained alignment."""

    name = "fmfa"

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
        pids = _get(batch, "pids", self.name)
        v, t = outputs["image_feats"], outputs["text_feats"]
        return {
            "a_sdm": losses.a_sdm(
                *scope.many(v, t), scope(pids), temperature=self.temperature, alpha=self.alpha, form=self.a_sdm_form
            ),
            "efa": losses.efa(
                outputs["image_tokens"][:, 1:],
                outputs["text_tokens"],
                _get(batch, "text_mask", self.name),
                margin_text=self.margin_text,
                margin_image=self.margin_image,
                pids=pids,
                form=self.efa_form,
                scope=scope,  # gathers the joint embeddings and the pair-score rows itself
            ),
            "mlm": _mlm(outputs, scope),
            "id": losses.id_loss(self.classifier, v, t, pids),
        }


class UIT(_DualMethod):
    """UIT (Liu et al. 2023): SDM, identity, hardest-negative triplet, text-guided restoration.

    Restoration: a greyscale copy of the image loses ``loss.restore_mask_ratio`` of its
    patches; the shared vision encoder sees the rest, and the decoder restores the colour
    pixels of every patch with the help of the caption. The target is the colour image's
    normalised pixels, not per-patch normalised (MAE's option): the colours a caption names
    are exactly what the greyscale input lacks, and per-patch normalisation would remove them.
    In eval mode the dropped patches are a fixed draw (seed 0), so outputs are deterministic.
    """

    name = "uit"

    def __init__(self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> None:
        super().__init__(cfg, num_classes, tokenizer)
        e = self.encoder.embed_dim
        self.restorer = RestorationHead(
            e, -(-e // 4) * 4, cfg.model.restore_depth, self.encoder.grid, self.encoder.patch_size
        )
        self.mask_ratio = float(cfg.loss.restore_mask_ratio)
        self.triplet_margin = float(cfg.loss.triplet_margin)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Global features plus the restoration of the masked greyscale image.

        Returns:
            ``image_feats``, ``text_feats`` (B, E); ``restore_pred`` and ``restore_target``
            (B, N, p*p*3); ``restore_mask`` (B, N) 1 on dropped patches.
        """
        out = self._global(batch)
        images = batch["images"]
        b, n = images.shape[0], self.encoder.num_patches
        # SEN's count: int((1 + N)(1 - r)) - 1 patches kept (its class token counted, then removed)
        keep = max(1, int((1 + n) * (1.0 - self.mask_ratio)) - 1)
        gen, noise = None, None
        if not self.training:
            gen = torch.Generator(device=images.device).manual_seed(0)
        elif "sample_seed" in batch:
            # Each sample's patches from its own seed: the same draw whatever the worker count.
            noise = row_uniform(batch["sample_seed"], n).to(images.device)
        keep_idx, dropped = random_keep(b, n, keep, images.device, gen, noise)
        visible = self.encoder.image_tokens(to_greyscale(images), keep=keep_idx)  # (B, 1 + K, E)
        out["restore_pred"] = self.restorer(visible, keep_idx, out["text_tokens"], batch["text_mask"])
        out["restore_target"] = patchify(images, self.encoder.patch_size)
        out["restore_mask"] = dropped
        return out

    def loss_terms(self, outputs: dict[str, Tensor], batch: Batch, scope: BatchScope = LOCAL) -> dict[str, Tensor]:
        """``sdm``, ``id``, ``triplet``, ``restore`` (unweighted)."""
        pids = _get(batch, "pids", self.name)
        v, t = outputs["image_feats"], outputs["text_feats"]
        (gv, gt), gp = scope.many(v, t), scope(pids)
        dropped = int(outputs["restore_mask"].sum())
        restore = losses.restore(outputs["restore_pred"], outputs["restore_target"], outputs["restore_mask"])
        return {
            "sdm": losses.sdm(gv, gt, gp, temperature=self.temperature),
            "id": losses.id_loss(self.classifier, v, t, pids),
            "triplet": losses.triplet(gv, gt, gp, margin=self.triplet_margin),
            # mean over the dropped patches of the global batch
            "restore": scope.mean(restore * dropped, dropped),
        }


class IVT(nn.Module):
    """IVT (Shu et al. 2022): shared encoder, multi-level CMPM, bidirectional mask modelling.

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

    name = "ivt"

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
        images = _get(batch, "images", self.name)
        b = images.shape[0]
        out: dict[str, Tensor] = {}
        if self.mla_form == "joint":
            views = [images] + [_get(batch, k, self.name, "level_images") for k in ("phrase_images", "word_images")]
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
        ids = [_get(batch, i, self.name, v) for i, _, v in levels]
        masks = [_get(batch, m, self.name, v) for _, m, v in levels]
        # One pass for the three levels (they share length and encoder).
        feats = self.encoder.encode_text(torch.cat(ids), torch.cat(masks), self._ratio())  # (3B, E)
        text_feats, phrase_feats, word_feats = feats.split(b)
        out.update(image_feats=image_feats, text_feats=text_feats, phrase_feats=phrase_feats, word_feats=word_feats)
        return out

    def loss_terms(self, outputs: dict[str, Tensor], batch: Batch, scope: BatchScope = LOCAL) -> dict[str, Tensor]:
        """``mla`` (unweighted): CMPM over the sentence, phrase and word levels (``loss.mla_form``)."""
        pids = scope(_get(batch, "pids", self.name))
        text_keys = ("text_feats", "phrase_feats", "word_feats")
        image_keys = ("image_feats", "phrase_image_feats", "word_image_feats") if self.mla_form == "joint" else ("image_feats",)
        gathered = scope.many(*(outputs[k] for k in text_keys + image_keys))
        texts, images = list(gathered[:3]), list(gathered[3:])
        if len(images) == 1:  # separate: every level against the sentence's image view
            images = images * 3
        return {"mla": losses.mla(images, texts, pids, form=self.mla_form, label_norm=self.label_norm)}


@register_method("irra")
def build_irra(cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> IRRA:
    """IRRA from the config; ``tokenizer.vocab_size`` includes the mask token."""
    return IRRA(cfg, num_classes, tokenizer)


@register_method("fmfa")
def build_fmfa(cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> FMFA:
    """FMFA from the config."""
    return FMFA(cfg, num_classes, tokenizer)


@register_method("uit")
def build_uit(cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> UIT:
    """UIT from the config."""
    return UIT(cfg, num_classes, tokenizer)


@register_method("ivt")
def build_ivt(cfg: ExperimentConfig, num_classes: int, tokenizer: Any) -> IVT:
    """IVT from the config."""
    return IVT(cfg, num_classes, tokenizer)
