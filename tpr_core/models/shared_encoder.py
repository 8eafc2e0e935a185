"""IVT's shared encoder: one transformer for images and text (built from ``timm`` ViT parts).

Every block has one self-attention and two layernorms shared by both modalities, and a
separate feed-forward network per modality (IVT, Shu et al., "See Finer, See More:
Implicit Modality Alignment for Text-based Person Retrieval", ECCV Workshops 2022).
Images enter through a patch embedding, text through token embeddings; each modality has
its own class token and learned positions. After a shared final norm, the class token is
projected into the joint space by a per-modality bias-free linear layer.

Text attention is bidirectional; padding is excluded with a key mask, so a caption's
embedding does not depend on its padding.

Bidirectional mask modelling (BMM, training only): a share of the non-class tokens is
dropped from both inputs. Image patches are *removed* from the sequence (the remaining
ones keep their positions); text tokens are *excluded through the attention mask* (no
token attends to them), which drops them without making the batch ragged. BOS and EOS of
a caption are never dropped.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp, PatchEmbed, trunc_normal_
from torch import Tensor, nn

from tpr_core.config import ModelConfig
from tpr_core.models.presets import TowerSize, shared_preset

__all__ = ["SharedBlock", "SharedEncoder", "build_shared_encoder", "drop_patches", "drop_text_tokens"]

_MODALITIES = ("image", "text")


class SharedBlock(nn.Module):
    """Pre-norm transformer block: shared attention and norms, one MLP per modality."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.ModuleDict({m: Mlp(width, mlp_width, act_layer=nn.GELU) for m in _MODALITIES})

    def forward(self, x: Tensor, modality: str, attn_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D); ``attn_mask`` (B, 1, 1, T) bool, True = may be attended to."""
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp[modality](self.norm2(x))


def drop_patches(tokens: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Remove ``floor(N * ratio)`` random patch tokens per image (same count for all images).

    Args:
        tokens: (B, N, D) patch tokens, positions already added.
        ratio: share to drop, in [0, 1).
        generator: optional seeded generator on the tokens' device.

    Returns:
        (B, N - floor(N * ratio), D), kept tokens in their original order.
    """
    b, n, d = tokens.shape
    n_drop = int(n * ratio)
    if n_drop <= 0:
        return tokens
    noise = torch.rand(b, n, device=tokens.device, generator=generator)
    keep = noise.argsort(dim=1)[:, : n - n_drop].sort(dim=1).values  # (B, K)
    return torch.gather(tokens, 1, keep[..., None].expand(-1, -1, d))


def drop_text_tokens(text_mask: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Mask out ``floor(n_i * ratio)`` random word tokens of each caption.

    Word tokens are the real tokens other than the first (BOS) and the last (EOS); ``n_i``
    is their count in caption i.

    Args:
        text_mask: (B, L) 1 on real tokens.
        ratio: share of word tokens to drop, in [0, 1).
        generator: optional seeded generator on the mask's device.

    Returns:
        (B, L) bool, True on the tokens that stay visible.
    """
    real = text_mask.bool()
    if ratio <= 0:
        return real
    b, length = real.shape
    pos = torch.arange(length, device=real.device)[None]  # (1, L)
    last = (text_mask.sum(1, keepdim=True) - 1).long()  # (B, 1)
    words = real & (pos != 0) & (pos != last)  # (B, L)
    n_drop = (words.sum(1, keepdim=True).float() * ratio).floor()  # (B, 1)
    noise = torch.rand(b, length, device=real.device, generator=generator)
    noise = noise.masked_fill(~words, 2.0)  # non-words rank after every word
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, L) rank of each position
    return real & ~(rank < n_drop)


class SharedEncoder(nn.Module):
    """One transformer for both modalities (IVT).

    Args:
        size: width, depth, heads, MLP ratio.
        embed_dim: joint space size.
        image_size: (H, W).
        patch_size: p.
        text_length: max caption tokens (positions).
        vocab_size: tokenizer vocabulary incl. the mask token.
    """

    def __init__(
        self,
        size: TowerSize,
        embed_dim: int,
        *,
        image_size: tuple[int, int],
        patch_size: int,
        text_length: int,
        vocab_size: int,
    ) -> None:
        super().__init__()
        w = size.width
        self.embed_dim = int(embed_dim)
        self.text_length = int(text_length)
        self.patch_embed = PatchEmbed(
            img_size=tuple(image_size), patch_size=patch_size, in_chans=3, embed_dim=w
        )
        self.grid = tuple(self.patch_embed.grid_size)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, w))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, w))
        self.token_embed = nn.Embedding(vocab_size, w)
        self.text_cls = nn.Parameter(torch.zeros(1, 1, w))
        self.text_pos = nn.Parameter(torch.zeros(1, 1 + text_length, w))
        self.blocks = nn.ModuleList([SharedBlock(w, size.heads, size.mlp_width) for _ in range(size.layers)])
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.image_proj = nn.Linear(w, embed_dim, bias=False)
        self.text_proj = nn.Linear(w, embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm ViT initialisation (truncated normal 0.02, tiny class tokens, zero biases).
        for p in (self.image_pos, self.text_pos):
            trunc_normal_(p, std=0.02)
        for p in (self.image_cls, self.text_cls):
            nn.init.normal_(p, std=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _run(self, x: Tensor, modality: str, attn_mask: Tensor | None = None) -> Tensor:
        for blk in self.blocks:
            x = blk(x, modality, attn_mask)
        return self.norm(x)

    def encode_image(
        self, images: Tensor, drop_ratio: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image embeddings.

        Args:
            images: (B, 3, H, W) normalised images.
            drop_ratio: share of patch tokens removed (BMM; 0 at evaluation).
            generator: optional seeded generator for the drop.

        Returns:
            (B, E) projected class tokens (not normalised).
        """
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))  # (B, N, W)
        x = x + self.image_pos[:, 1:]
        x = drop_patches(x, drop_ratio, generator)  # (B, K, W)
        cls = (self.image_cls + self.image_pos[:, :1]).expand(x.shape[0], -1, -1)
        x = self._run(torch.cat([cls, x], dim=1), "image")
        return self.image_proj(x[:, 0])

    def encode_text(
        self,
        text_ids: Tensor,
        text_mask: Tensor,
        drop_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Text embeddings.

        Args:
            text_ids: (B, L) ids (BOS, tokens, EOS, padding), L <= text_length.
            text_mask: (B, L) 1 on real tokens.
            drop_ratio: share of word tokens hidden from attention (BMM; 0 at evaluation).
            generator: optional seeded generator for the drop.

        Returns:
            (B, E) projected class tokens (not normalised).
        """
        b, length = text_ids.shape
        if length > self.text_length:
            raise ValueError(f"text of {length} tokens exceeds model.text_length {self.text_length}")
        x = self.token_embed(text_ids) + self.text_pos[:, 1 : 1 + length]  # (B, L, W)
        cls = (self.text_cls + self.text_pos[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L, W)
        visible = drop_text_tokens(text_mask, drop_ratio, generator)  # (B, L)
        visible = torch.cat([visible.new_ones(b, 1), visible], dim=1)  # class token always visible
        x = self._run(x, "text", visible[:, None, None, :])
        return self.text_proj(x[:, 0])


def build_shared_encoder(model_cfg: ModelConfig, vocab_size: int) -> SharedEncoder:
    """The shared encoder of ``model_cfg`` (preset sizes, ``model.embed_dim`` override)."""
    preset = shared_preset(model_cfg.preset)
    return SharedEncoder(
        preset.tower,
        model_cfg.embed_dim or preset.embed_dim,
        image_size=tuple(model_cfg.image_size),
        patch_size=model_cfg.patch_size,
        text_length=model_cfg.text_length,
        vocab_size=vocab_size,
    )
