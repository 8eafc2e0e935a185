"""Auxiliary heads: IRR masked-token prediction, identity classifier, UIT image restoration.

All heads work in the joint space of the dual encoder (its projected tokens).

References:
    IRRA: Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image
        Person Retrieval", CVPR 2023 (implicit relation reasoning, identity loss).
    UIT: Liu et al., "Text-guided Image Restoration and Semantic Enhancement for Text-to-Image
        Person Retrieval", arXiv 2307.09059 (greyscale masked image, restored with the caption);
        code released as SEN (github.com/Delong-liu-bupt/SEN, ``model/build.py``).
    MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (random
        patch keep, mask token, fixed 2-D sin-cos positions in the decoder).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig
from transformers.activations import QuickGELUActivation
from transformers.models.clip.modeling_clip import CLIPEncoder

from tpr_core.models.dual_encoder import init_clip_layers

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GREY_WEIGHTS",
    "IRRHead",
    "RestorationHead",
    "attention_heads",
    "identity_classifier",
    "patchify",
    "random_keep",
    "sincos_2d",
    "to_greyscale",
]

# The normalisation of the batch contract (``images`` are normalised with CLIP mean/std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SEN's ``rgb_to_weighted_grayscale`` (model/build.py): R, G, B weights (MATLAB rgb2gray's BT.601).
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def attention_heads(width: int) -> int:
    """Heads of a head transformer: width / 64 as IRRA, at least 1, and dividing ``width``."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def _transformer(width: int, depth: int) -> CLIPEncoder:
    """A bidirectional stack of CLIP residual blocks (IRRA's ``Transformer``)."""
    cfg = CLIPTextConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=attention_heads(width),
        intermediate_size=4 * width,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
        attn_implementation="sdpa",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return CLIPEncoder(cfg)


def _init_transformer(stack: CLIPEncoder, width: int, depth: int) -> None:
    # IRRA (and SEN) initialise their cross-modal transformers like CLIP's text transformer:
    # normal weights; the attention biases are zero (nn.MultiheadAttention's packed in_proj
    # and out_proj biases start at zero), the MLP biases keep nn.Linear's default uniform init.
    init_clip_layers(stack.layers, width, depth, zero_mlp_bias=False)


# --------------------------------------------------------------------------- IRR


class IRRHead(nn.Module):
    """Implicit relation reasoning (IRRA): predict masked caption tokens from the image.

    The masked caption's tokens (already through the shared text encoder) query the image
    tokens in one cross-attention layer; a transformer of depth ``depth`` and a layernorm
    follow, then the MLM head (Linear, QuickGELU, LayerNorm, Linear to the vocabulary).
    As in IRRA there is no residual around the cross-attention (the text queries are only
    layernormed inputs to it), and no padding mask in the transformer: padding positions
    carry no label.

    Args:
        width: joint space size (text and image tokens).
        depth: layers of the cross-modal transformer (``model.cross_depth``).
        vocab_size: tokenizer vocabulary incl. the mask token.
    """

    def __init__(self, width: int, depth: int, vocab_size: int) -> None:
        super().__init__()
        heads = attention_heads(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_pre_t = nn.LayerNorm(width)
        self.ln_pre_i = nn.LayerNorm(width)
        self.transformer = _transformer(width, depth)
        self.ln_post = nn.LayerNorm(width)
        self.mlm_head = nn.Sequential(
            nn.Linear(width, width), QuickGELUActivation(), nn.LayerNorm(width), nn.Linear(width, vocab_size)
        )
        scale = width**-0.5
        proj_std = scale * (2 * depth) ** -0.5
        _init_transformer(self.transformer, width, depth)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=scale)
        nn.init.zeros_(self.cross_attn.in_proj_bias)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(self.cross_attn.out_proj.bias)
        nn.init.normal_(self.mlm_head[0].weight, std=(2 * width) ** -0.5)
        nn.init.normal_(self.mlm_head[3].weight, std=proj_std)

    def fuse(self, text_tokens: Tensor, image_tokens: Tensor) -> Tensor:
        """Cross-modal token features.

        Args:
            text_tokens: (B, L, E) masked caption tokens.
            image_tokens: (B, 1 + N, E) image tokens (class token included, as IRRA).

        Returns:
            (B, L, E) fused, layernormed text-position features.
        """
        img = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), img, img, need_weights=False)[0]  # (B, L, E)
        x = self.transformer(inputs_embeds=x).last_hidden_state
        return self.ln_post(x)

    def forward(self, text_tokens: Tensor, image_tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Vocabulary scores at the labelled (masked) positions only.

        The vocabulary projection runs only where ``labels != -100``: with CLIP's 49k
        vocabulary, scoring every position of a 77-token batch would dominate memory.

        Args:
            text_tokens: (B, L, E) masked caption tokens.
            image_tokens: (B, 1 + N, E).
            labels: (B, L) original ids at masked positions, -100 elsewhere.

        Returns:
            ``(logits, labels)`` of shapes (1, M, V) and (1, M), M = number of labelled
            positions (the (B, L, V) / (B, L) layout of ``tpr_core.losses.mlm`` with B = 1).
        """
        x = self.fuse(text_tokens, image_tokens)  # (B, L, E)
        sel = labels != -100  # (B, L)
        logits = self.mlm_head(x[sel])  # (M, V)
        return logits[None], labels[sel][None]


def identity_classifier(width: int, num_classes: int) -> nn.Linear:
    """One linear classifier over training identities, shared by both modalities (IRRA init)."""
    fc = nn.Linear(width, num_classes)
    nn.init.normal_(fc.weight, std=0.001)
    nn.init.zeros_(fc.bias)
    return fc


# --------------------------------------------------------------------------- UIT restoration


def to_greyscale(images: Tensor) -> Tensor:
    """SEN's greyscale copy: ``0.2989 R + 0.5870 G + 0.1140 B``, replicated to 3 channels.

    Exactly SEN's ``rgb_to_weighted_grayscale``: the weights apply to the channels of the
    tensor as given, i.e. to the CLIP-normalised batch (SEN calls it on ``batch['images']``
    after ``T.Normalize``), not to de-normalised pixels. The result is therefore not the
    normalised luma of the image: for a grey pixel of value v every output channel is
    ``sum_c w_c (v - mean_c) / std_c`` (about ``(v - 0.46) / 0.27``), while the encoder's
    colour input for the same pixel is ``(v - mean_c) / std_c`` per channel.

    Args:
        images: (B, 3, H, W), normally the CLIP-normalised batch.

    Returns:
        (B, 3, H, W) the weighted channel sum in every channel.
    """
    w = images.new_tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
    grey = (images * w).sum(1, keepdim=True)  # (B, 1, H, W)
    return grey.expand_as(images).contiguous()


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches, row-major like the patch embedding.

    Args:
        images: (B, C, H, W).
        patch_size: p, dividing H and W.

    Returns:
        (B, (H/p) * (W/p), p * p * C), each patch flattened as (p, p, C).
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def random_keep(
    batch: int,
    num_patches: int,
    keep: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A random subset of patches per image (MAE's per-sample shuffle).

    Args:
        batch: B.
        num_patches: N.
        keep: K patches kept per image.
        device: where the indices live.
        generator: a seeded generator for a fixed draw (on ``device``), or None.
        noise: (B, N) uniform scores to rank the patches by, instead of drawing them (the
            patches with the K lowest scores are kept).

    Returns:
        ``(keep_idx, dropped)``: (B, K) kept patch indices in increasing order, and (B, N)
        float 1 on dropped patches, 0 on kept ones.
    """
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    keep_idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K)
    dropped = torch.ones(batch, num_patches, device=device)
    dropped.scatter_(1, keep_idx, 0.0)
    return keep_idx, dropped


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos positions (MAE): half the channels encode the row, half the column.

    Args:
        dim: channels, divisible by 4.
        grid: (gh, gw).

    Returns:
        (gh * gw, dim), row-major over the grid.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)

    def enc(coord: Tensor) -> Tensor:
        angle = coord.reshape(-1, 1) * freq[None]  # (N, dim/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # (N, dim/2)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()  # (N, dim)


class RestorationHead(nn.Module):
    """UIT's text-guided restoration decoder, as SEN's ``cross_former_mae`` (``model/build.py``).

    The encoder has seen only the kept patches of a greyscale image (plus its class token).
    In SEN's order:

    1. layernorm the image tokens (SEN ``norm_1``) and the caption tokens (``norm_2``);
    2. project the image tokens to the decoder width (``decoder_embed``), put the mask token
       (zero-initialised, as SEN, which never re-initialises it) at every dropped patch,
       restore the grid order, keep the class token first;
    3. add fixed 2-D sin-cos positions (MAE's ``get_2d_sincos_pos_embed``: the first half of
       the channels encodes the column, the second half the row; zero at the class token);
    4. one cross-attention, queries = the layernormed (``norm_4``) image tokens, mask tokens
       and class token included, keys and values = the caption tokens, **without a residual
       and without a padding mask**: its layernormed output (``norm_6``) *replaces* the image
       tokens, so everything the decoder knows about the image reaches it through attention
       weights over the caption (the image tokens choose which caption tokens to read);
    5. a bidirectional transformer of depth ``depth`` (CLIP residual blocks, QuickGELU;
       SEN's ``cross_modal_transformer_mae`` with ``cmt_depth`` 4), a layernorm (``norm_7``)
       and a linear layer to each patch's ``p * p * 3`` colour pixels (``decoder_pred``); the
       class position is dropped.

    Initialisation as SEN: cross-attention input projections normal with std
    ``width**-0.5``, output projection ``width**-0.5 * (2 * depth)**-0.5``, zero attention
    biases; the transformer as IRRA's; the two linear layers keep PyTorch's default init.

    What still differs from SEN, and why:

    - ``text_mask`` is accepted but unused: SEN attends to every caption position, padding
      included. The padding tokens themselves differ: SEN pads CLIP ids with 0 (the token
      "!"), tpr with the tokenizer's pad id (data side, not this head).
    - How many patches are dropped is decided in ``UIT.forward``, not here: SEN keeps
      ``int((1 + N) (1 - r)) - 1`` patches (its class token counts in the masking length) and,
      by an off-by-one in its ``random_masking``, leaves one dropped patch out of the loss
      mask; tpr keeps the same count and scores every dropped patch (N = 192, r = 0.7: both
      keep 56; SEN scores 135 of the 136 dropped patches, tpr all 136).
    - Precision: SEN converts the model to fp16 and casts the decoder input to fp16; tpr
      runs in ``distributed.precision``.
    - SEN also builds ``cross_attn_TextImage``, ``cross_attn_Image``, ``norm_3`` and
      ``norm_5`` and never uses them; they are left out (no gradient, no effect).
    - The decoder width is ``decoder_width`` (UIT passes the joint size rounded up to a
      multiple of 4, i.e. SEN's ``embed_dim`` whenever that is divisible by 4, as 512 is).

    Args:
        width: joint space size (encoder tokens and caption tokens).
        decoder_width: decoder token width (divisible by 4 for the sin-cos positions).
        depth: decoder transformer layers (``model.restore_depth``).
        grid: (gh, gw) patch grid.
        patch_size: p.
    """

    def __init__(
        self, width: int, decoder_width: int, depth: int, grid: tuple[int, int], patch_size: int
    ) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch_size = patch_size
        heads = attention_heads(decoder_width)
        self.ln_image = nn.LayerNorm(width)  # SEN norm_1
        self.ln_text = nn.LayerNorm(width)  # SEN norm_2
        self.embed = nn.Linear(width, decoder_width)  # SEN decoder_embed
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        # MAE / SEN channel order: columns in the first half, rows in the second; class row zero.
        # The buffer is fixed (not trained, not saved).
        rows_cols = sincos_2d(decoder_width, self.grid)  # rows first, then columns
        half = decoder_width // 2
        pos = torch.cat([rows_cols[:, half:], rows_cols[:, :half]], dim=1)
        pos = torch.cat([torch.zeros(1, decoder_width), pos], dim=0)
        self.register_buffer("pos_embed", pos[None], persistent=False)  # (1, 1 + N, Dd)
        self.ln_q = nn.LayerNorm(decoder_width)  # SEN norm_4
        self.cross_attn = nn.MultiheadAttention(
            decoder_width, heads, kdim=width, vdim=width, batch_first=True
        )  # SEN cross_attn_Text
        self.ln_fused = nn.LayerNorm(decoder_width)  # SEN norm_6
        self.transformer = _transformer(decoder_width, depth)  # SEN cross_modal_transformer_mae
        self.norm = nn.LayerNorm(decoder_width)  # SEN norm_7
        self.pred = nn.Linear(decoder_width, patch_size * patch_size * 3)  # SEN decoder_pred
        scale = decoder_width**-0.5
        proj_std = scale * (2 * depth) ** -0.5
        attn = self.cross_attn
        if attn.in_proj_weight is not None:  # kdim == vdim == decoder_width: one packed matrix
            nn.init.normal_(attn.in_proj_weight, std=scale)
        else:
            for w in (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight):
                nn.init.normal_(w, std=scale)
        nn.init.normal_(attn.out_proj.weight, std=proj_std)
        _init_transformer(self.transformer, decoder_width, depth)

    def queries(self, visible: Tensor, keep_idx: Tensor) -> Tensor:
        """Decoder tokens before the cross-attention (steps 1-3 for the image side).

        Args:
            visible: (B, 1 + K, E) encoder tokens of the kept patches (class token first).
            keep_idx: (B, K) grid index of each kept patch.

        Returns:
            (B, 1 + N, Dd) class token, then every patch in grid order (mask token where
            dropped), positions added.
        """
        b = visible.shape[0]
        n = self.grid[0] * self.grid[1]
        x = self.embed(self.ln_image(visible))  # (B, 1 + K, Dd)
        d = x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, n, d)  # (B, N, Dd)
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, d), x[:, 1:])  # unshuffle
        return torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + N, Dd)

    def decode(self, fused: Tensor) -> Tensor:
        """Everything after the cross-attention: (B, 1 + N, Dd) attention output -> pixels.

        The prediction is a function of the cross-attention output alone (no residual).

        Returns:
            (B, N, p * p * 3).
        """
        x = self.transformer(inputs_embeds=self.ln_fused(fused)).last_hidden_state
        return self.pred(self.norm(x[:, 1:]))

    def forward(self, visible: Tensor, keep_idx: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """Predict the pixels of every patch.

        Args:
            visible: (B, 1 + K, E) encoder tokens of the kept patches (class token first).
            keep_idx: (B, K) grid index of each kept patch.
            text_tokens: (B, L, E) the encoded caption (every position, padding included).
            text_mask: (B, L) 1 on real caption tokens; unused, as in SEN (see the class notes).

        Returns:
            (B, N, p * p * 3) predicted pixels (normalised colour), all N patches.
        """
        del text_mask  # SEN attends to the padding positions too
        x = self.queries(visible, keep_idx)  # (B, 1 + N, Dd)
        kv = self.ln_text(text_tokens)  # (B, L, E)
        fused = self.cross_attn(self.ln_q(x), kv, kv, need_weights=False)[0]  # (B, 1 + N, Dd)
        return self.decode(fused)  # (B, N, p*p*3)
