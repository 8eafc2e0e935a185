"""UIT (Liu et al. 2023): dual encoder; SDM + identity + hardest-negative triplet + text-guided
restoration of a greyscale, 70 %-masked copy of the image.

The recipe weighs its four terms 1 and asks the data side for UIT's caption pruning
(view ``text_aug``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpr_core import losses
from tpr_core.config import ExperimentConfig
from tpr_core.distributed import LOCAL, BatchScope
from tpr_core.models.heads import RestorationHead, patchify, random_keep, to_greyscale
from tpr_core.models.methods._common import Batch, DualMethod, need, row_uniform
from tpr_core.models.registry import MethodSpec, register_method


@register_method(
    MethodSpec(
        "uit",
        encoder="dual",
        terms={"sdm": 1.0, "id": 1.0, "triplet": 1.0, "restore": 1.0},
        views=("text_aug",),
        sampler="identity_random_k",  # SEN's --sampler idrannum
    )
)
class UIT(DualMethod):
    """UIT: SDM, identity, hardest-negative triplet, text-guided restoration.

    Restoration: a greyscale copy of the image loses ``loss.restore_mask_ratio`` of its
    patches; the shared vision encoder sees the rest, and the decoder restores the colour
    pixels of every patch with the help of the caption. The target is the colour image's
    normalised pixels, not per-patch normalised (MAE's option): the colours a caption names
    are exactly what the greyscale input lacks, and per-patch normalisation would remove them.
    In eval mode the dropped patches are a fixed draw (seed 0), so outputs are deterministic.
    """

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
        pids = need(batch, "pids", self.spec.name)
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
