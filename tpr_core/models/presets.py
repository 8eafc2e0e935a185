"""Named encoder sizes (``model.preset``).

A preset fixes widths, depths and head counts only; the image grid comes from
``model.image_size`` / ``model.patch_size`` and the text length from ``model.text_length``,
so one preset serves any input size. ``model.embed_dim`` overrides a preset's joint size.

- ``tiny``: a few layers of width 128; a method trains in minutes on 2 CPU cores.
- ``base``: CLIP ViT-B/16 (vision 768 wide, 12 layers, 12 heads; text 512 wide, 12 layers,
  8 heads; joint space 512). The shared (IVT) encoder's base is ViT-B/16 (768 wide, 12 layers,
  12 heads, the sizes of BERT-base too) with IVT's 768-wide embeddings (no projection).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TowerSize:
    """One transformer stack.

    Attributes:
        width: token width.
        layers: number of blocks.
        heads: attention heads (must divide ``width``).
        mlp_ratio: feed-forward hidden size as a multiple of ``width``.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class DualPreset:
    """Sizes of the CLIP-style dual encoder (irra, fmfa, uit)."""

    vision: TowerSize
    text: TowerSize
    embed_dim: int


@dataclass(frozen=True)
class SharedPreset:
    """Sizes of the shared encoder (ivt)."""

    tower: TowerSize
    embed_dim: int


DUAL_PRESETS: dict[str, DualPreset] = {
    "tiny": DualPreset(TowerSize(128, 2, 4), TowerSize(128, 2, 4), embed_dim=128),
    # CLIP ViT-B/16 (Radford et al. 2021, table 20).
    "base": DualPreset(TowerSize(768, 12, 12), TowerSize(512, 12, 8), embed_dim=512),
}

SHARED_PRESETS: dict[str, SharedPreset] = {
    "tiny": SharedPreset(TowerSize(128, 2, 4), embed_dim=128),
    # ViT-B/16, as IVT (Shu et al. 2022) uses for its single shared backbone; IVT's embeddings
    # are the 768-wide class tokens (model/make_model_vl.py: out_vis = t_vis[:, 0]), no projection.
    "base": SharedPreset(TowerSize(768, 12, 12), embed_dim=768),
}


def dual_preset(name: str) -> DualPreset:
    """The dual-encoder preset ``name``; an unknown name is an error listing the known ones."""
    try:
        return DUAL_PRESETS[name]
    except KeyError:
        raise ValueError(f"model.preset {name!r} is unknown; known presets: {sorted(DUAL_PRESETS)}") from None


def shared_preset(name: str) -> SharedPreset:
    """The shared-encoder preset ``name``; an unknown name is an error listing the known ones."""
    try:
        return SHARED_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"model.preset {name!r} is unknown; known presets: {sorted(SHARED_PRESETS)}"
        ) from None
