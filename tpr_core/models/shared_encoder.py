"""IVT's shared encoder: one transformer for images and text (built from ``timm`` ViT parts).

As IVT's ``UVT_Bert_IMG_TXT_MASK`` (``model/backbones/vit_vl.py``; Shu et al., "See Finer,
See More: Implicit Modality Alignment for Text-based Person Retrieval", ECCV Workshops 2022):
every block has one self-attention and two layernorms shared by both modalities, and a
separate feed-forward network per modality (``mlp_vis`` / ``mlp_txt`` there), with
stochastic depth rising linearly to ``model.drop_path`` over the blocks.

- Images: a patch embedding (kernel ``patch_size``, stride ``model.patch_stride``, so the
  patches overlap when the stride is smaller), a class token, learned positions plus IVT's
  learned image ``type_embed`` (here ``image_type``).
- Text: BERT's embedding layer (word + position + token-type-0 embeddings, layernorm,
  dropout ``model.text_dropout``); there is no extra class token: the first token (BOS,
  ``[CLS]`` with BERT's tokenizer) is the text's class token, as in IVT.

After the shared final norm, each modality's class token is its embedding. IVT has no
projection (its embeddings are 768-wide); a projection (bias-free linear layer per modality)
exists only when ``model.embed_dim`` differs from the encoder width.

Text attention is bidirectional; padding is excluded with a key mask, so a caption's
embedding does not depend on its padding.

Bidirectional mask modelling (BMM, training only): a share of the non-class tokens is
dropped from both inputs. Image patches are *removed* from the sequence (the remaining
ones keep their positions); text tokens are *excluded through the attention mask* (no
token attends to them), which drops them without making the batch ragged. BOS and EOS of
a caption are never dropped.

``model.pretrained`` (a timm ViT checkpoint) and ``model.pretrained_text`` (a Hugging Face
BERT folder) initialise the encoder as IVT's ``load_param_hybrid``: see
:mod:`tpr_core.models.ivt_pretrained`.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Attention, DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

from tpr_core.config import ModelConfig
from tpr_core.models.presets import TowerSize, shared_preset

__all__ = [
    "OverlapPatchEmbed",
    "SharedBlock",
    "SharedEncoder",
    "build_shared_encoder",
    "drop_patches",
    "drop_text_tokens",
    "patch_grid",
]

_MODALITIES = ("image", "text")
# BERT's embedding layernorm epsilon (bert-base-uncased config.json, IVT config/config_bert.json).
BERT_LN_EPS = 1e-12


def patch_grid(image_size: tuple[int, int], patch_size: int, stride: int) -> tuple[int, int]:
    """Patch rows and columns of a ``patch_size`` kernel sliding by ``stride``: ``(H - p) // s + 1``."""
    h, w = image_size
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


class OverlapPatchEmbed(nn.Module):
    """Patch embedding with a stride (IVT's ``PatchEmbed_overlap``): a conv, flattened row-major.

    With ``stride == patch_size`` it is timm's ``PatchEmbed``. The weights start as IVT's
    (normal, std ``sqrt(2 / (p * p * width))``; the bias keeps PyTorch's default).

    Attributes:
        proj: the ``Conv2d(3, width, kernel=patch_size, stride=stride)``.
        grid_size: (rows, columns) of patches.
        num_patches: rows x columns.
    """

    def __init__(self, image_size: tuple[int, int], patch_size: int, stride: int, width: int) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.patch_size = int(patch_size)
        self.stride = int(stride)
        self.grid_size = patch_grid(self.image_size, self.patch_size, self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride)
        nn.init.normal_(self.proj.weight, std=math.sqrt(2.0 / (patch_size * patch_size * width)))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, rows * columns, width)."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"image of size {tuple(images.shape[-2:])}, the model expects {self.image_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


class SharedBlock(nn.Module):
    """Pre-norm transformer block: shared attention and norms, one MLP per modality."""

    def __init__(self, width: int, heads: int, mlp_width: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.ModuleDict({m: Mlp(width, mlp_width, act_layer=nn.GELU) for m in _MODALITIES})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, modality: str, attn_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D); ``attn_mask`` (B, 1, 1, T) bool, True = may be attended to."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.drop_path(self.mlp[modality](self.norm2(x)))


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
        embed_dim: joint space size; equal to ``size.width`` means no projection (IVT).
        image_size: (H, W).
        patch_size: p, the patch embedding's kernel.
        text_length: max caption tokens (positions), BOS and EOS included.
        vocab_size: tokenizer vocabulary incl. the mask token.
        patch_stride: the patch embedding's stride; None = ``patch_size`` (no overlap).
        drop_path: stochastic depth of the last block (0 for the first, linear in between).
        text_dropout: dropout after the text embedding's layernorm.
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
        patch_stride: int | None = None,
        drop_path: float = 0.0,
        text_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        w = size.width
        self.width = w
        self.embed_dim = int(embed_dim)
        self.text_length = int(text_length)
        self.patch_embed = OverlapPatchEmbed(tuple(image_size), patch_size, patch_stride or patch_size, w)
        self.grid = tuple(self.patch_embed.grid_size)
        n = self.patch_embed.num_patches
        self.image_cls = nn.Parameter(torch.zeros(1, 1, w))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + n, w))
        self.image_type = nn.Parameter(torch.zeros(1, 1 + n, w))  # IVT's type_embed (images only)
        # BERT's embedding layer: word + position + token type 0, layernorm, dropout.
        self.token_embed = nn.Embedding(vocab_size, w)
        self.text_pos = nn.Parameter(torch.zeros(1, text_length, w))
        self.text_type = nn.Parameter(torch.zeros(1, 1, w))
        self.text_norm = nn.LayerNorm(w, eps=BERT_LN_EPS)
        self.text_drop = nn.Dropout(text_dropout)
        depth = size.layers
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # IVT's linspace(0, rate, depth)
        self.blocks = nn.ModuleList(
            [SharedBlock(w, size.heads, size.mlp_width, rates[i]) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(w, eps=1e-6)
        if self.embed_dim == w:
            self.image_proj: nn.Module = nn.Identity()
            self.text_proj: nn.Module = nn.Identity()
        else:
            self.image_proj = nn.Linear(w, self.embed_dim, bias=False)
            self.text_proj = nn.Linear(w, self.embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # IVT's initialisation (timm ViT's): truncated normal 0.02 for the class token,
        # positions, type embeddings and every linear layer (zero biases); layernorms 1 / 0.
        for p in (self.image_cls, self.image_pos, self.image_type, self.text_pos, self.text_type):
            trunc_normal_(p, std=0.02)
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
            (B, E) class tokens after the final norm (projected if E != width; not normalised).
        """
        pos = self.image_pos + self.image_type  # (1, 1 + N, W)
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))  # (B, N, W)
        x = x + pos[:, 1:]
        x = drop_patches(x, drop_ratio, generator)  # (B, K, W)
        cls = (self.image_cls + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = self._run(torch.cat([cls, x], dim=1), "image")
        return self.image_proj(x[:, 0])

    def embed_text(self, text_ids: Tensor) -> Tensor:
        """BERT's embedding layer: (B, L) ids -> (B, L, W)."""
        length = text_ids.shape[1]
        if length > self.text_length:
            raise ValueError(f"text of {length} tokens exceeds model.text_length {self.text_length}")
        x = self.token_embed(text_ids) + self.text_type + self.text_pos[:, :length]
        return self.text_drop(self.text_norm(x))

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
            (B, E) the first token (BOS / ``[CLS]``) after the final norm (projected if
            E != width; not normalised).
        """
        x = self.embed_text(text_ids)  # (B, L, W)
        visible = drop_text_tokens(text_mask, drop_ratio, generator)  # (B, L); BOS always visible
        x = self._run(x, "text", visible[:, None, None, :])
        return self.text_proj(x[:, 0])


def build_shared_encoder(model_cfg: ModelConfig, vocab_size: int) -> SharedEncoder:
    """The shared encoder of ``model_cfg``: preset sizes, ``model.embed_dim`` override, then
    the weights of ``model.pretrained`` (timm ViT) and ``model.pretrained_text`` (BERT) if set.

    The sizes always come from the preset (``base`` is ViT-B/16 = BERT-base's width and depth);
    a checkpoint of other sizes is an error naming the file and the field that differs, so a
    model built without the checkpoints has the same parameters (how an exported model
    rebuilds itself before its own weights are loaded).
    """
    preset = shared_preset(model_cfg.preset)
    enc = SharedEncoder(
        preset.tower,
        model_cfg.embed_dim or preset.embed_dim,
        image_size=tuple(model_cfg.image_size),
        patch_size=model_cfg.patch_size,
        text_length=model_cfg.text_length,
        vocab_size=vocab_size,
        patch_stride=model_cfg.patch_stride,
        drop_path=model_cfg.drop_path,
        text_dropout=model_cfg.text_dropout,
    )
    if model_cfg.pretrained is not None or model_cfg.pretrained_text is not None:
        from tpr_core.models.ivt_pretrained import load_bert, load_vit

        if model_cfg.pretrained is not None:
            load_vit(enc, model_cfg.pretrained)
        if model_cfg.pretrained_text is not None:
            load_bert(enc, model_cfg.pretrained_text)
    return enc
