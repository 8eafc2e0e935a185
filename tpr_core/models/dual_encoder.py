"""CLIP-style dual encoder (irra, fmfa, uit), built from ``transformers``' CLIP layers.

Image tower: a ViT on non-square pedestrian images (384x128 with 16x16 patches is a 24x8
grid) with one learned position per grid cell plus the class position. Text tower: CLIP's
causal transformer. Both end in a layernorm and a bias-free projection to the joint space.

As in IRRA, the final layernorm and the projection are applied to *every* token, so the
heads get token-level features in the joint space: all image tokens (class token first,
then the patches row by row) and all text tokens. The global image feature is the class
token; the global text feature is the end-of-text token, found at position
``text_mask.sum(1) - 1`` (the tokenizer puts EOS last among the real tokens; CLIP's
"argmax of the ids" trick would break once a mask token is added after EOS in the vocab).

Module and parameter names mirror ``transformers.CLIPModel`` (``vision_model``,
``text_model``, ``visual_projection``, ``text_projection``) so a Hugging Face CLIP
checkpoint loads with a strict ``load_state_dict`` after three tensors are adapted: the
vision position embeddings (interpolated to our grid), the text position embeddings
(cut to ``model.text_length``) and the token embedding (grown by the mask token).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPTextEmbeddings

from tpr_core.config import ModelConfig
from tpr_core.models.presets import TowerSize, dual_preset

__all__ = [
    "DualEncoder",
    "build_dual_encoder",
    "check_clip_dir",
    "clip_skeleton",
    "interpolate_pos_embed",
    "load_clip_dir",
    "pool_eos",
]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# --------------------------------------------------------------------------- helpers


def pool_eos(tokens: Tensor, text_mask: Tensor) -> Tensor:
    """Pick each caption's end-of-text token.

    Args:
        tokens: (B, L, D) token features.
        text_mask: (B, L) 1 on real tokens (BOS..EOS), 0 on padding.

    Returns:
        (B, D) the features at position ``text_mask.sum(1) - 1``.
    """
    eos = (text_mask.sum(1) - 1).clamp(min=0).long()  # (B,)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), eos]


def interpolate_pos_embed(
    pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bicubic"
) -> Tensor:
    """Resample ViT position embeddings to another patch grid.

    The class position (row 0) is kept as is; the patch positions are laid out on their
    2-D grid and resized bicubically (``align_corners=False``), as when fine-tuning CLIP
    on 384x128 pedestrian crops.

    Args:
        pos: (1 + gh*gw, D) class position then patch positions, row-major.
        old_grid: (gh, gw) the grid ``pos`` was trained on.
        new_grid: (gh', gw') the target grid.
        mode: ``F.interpolate`` mode (``bicubic`` for CLIP; IVT resizes ``bilinear``).

    Returns:
        (1 + gh'*gw', D), same dtype as ``pos``.
    """
    gh, gw = old_grid
    if pos.shape[0] != 1 + gh * gw:
        raise ValueError(
            f"position embedding has {pos.shape[0]} rows, expected 1 + {gh}x{gw} for grid {old_grid}"
        )
    if tuple(new_grid) == tuple(old_grid):
        return pos.clone()
    cls, patches = pos[:1], pos[1:]
    dim = pos.shape[1]
    grid = patches.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(-1, dim).to(pos.dtype)  # (gh'*gw', D)
    return torch.cat([cls, patches], dim=0)


def init_clip_layers(layers: Iterable[nn.Module], width: int, depth: int, zero_mlp_bias: bool) -> None:
    """CLIP's initialisation of a stack of ``CLIPEncoderLayer``: normal weights (attention
    ``width**-0.5``, output projections ``width**-0.5 * (2 depth)**-0.5``, MLP input
    ``(2 width)**-0.5``), zero attention biases, and zero MLP biases when ``zero_mlp_bias``
    (otherwise nn.Linear's default)."""
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for layer in layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            nn.init.normal_(lin.weight, std=attn_std)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(layer.self_attn.out_proj.bias)
        nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)
        if zero_mlp_bias:
            nn.init.zeros_(layer.mlp.fc1.bias)
            nn.init.zeros_(layer.mlp.fc2.bias)


def _tower_config(
    cls: type[CLIPVisionConfig] | type[CLIPTextConfig],
    size: TowerSize,
    *,
    intermediate: int | None = None,
    layer_norm_eps: float = 1e-5,
    hidden_act: str = "quick_gelu",
    **extra: int | None,
) -> CLIPVisionConfig | CLIPTextConfig:
    # SDPA everywhere: the text tower passes ``is_causal=True`` instead of a mask, which
    # only the SDPA path honours (eager attention would silently be bidirectional).
    if cls is CLIPTextConfig:
        # Special ids belong to our tokenizer, not to this config (pooling uses text_mask).
        extra = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **extra}
    return cls(
        hidden_size=size.width,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=intermediate or size.mlp_width,
        layer_norm_eps=layer_norm_eps,
        hidden_act=hidden_act,
        attention_dropout=0.0,
        attn_implementation="sdpa",
        **extra,
    )


# --------------------------------------------------------------------------- towers


class VisionEmbeddings(nn.Module):
    """Patch embedding, class token and one learned position per cell of a (gh, gw) grid."""

    def __init__(self, width: int, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.position_embedding = nn.Embedding(1 + self.grid[0] * self.grid[1], width)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Embed images; optionally keep only some patches (MAE-style restoration).

        Args:
            images: (B, 3, H, W) normalised images on this module's grid.
            keep: (B, K) indices of the patches to keep, or None for all.

        Returns:
            (B, 1 + K, D) class token then the kept patch tokens, positions added.
        """
        b = images.shape[0]
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # (B, D, gh, gw)
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} give a {tuple(x.shape[-2:])} patch grid; "
                f"the encoder is built for {self.grid} (model.image_size / model.patch_size)"
            )
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.position_embedding.weight  # (1 + N, D)
        # Positions go on before any patch is dropped, so kept patches remember where they were.
        x = x + pos[1:]
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (self.class_embedding + pos[0]).expand(b, 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1)


class VisionTower(nn.Module):
    """CLIP's ViT: embeddings, pre-layernorm, encoder, post-layernorm (on every token)."""

    def __init__(self, config: CLIPVisionConfig, grid: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config.hidden_size, config.patch_size, grid)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + K, Dv) layernormed tokens (class token first)."""
        x = self.pre_layrnorm(self.embeddings(images, keep))
        x = self.encoder(inputs_embeds=x).last_hidden_state
        return self.post_layernorm(x)


class TextTower(nn.Module):
    """CLIP's causal text transformer: token + position embeddings, encoder, final layernorm."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, text_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, Dt) layernormed tokens.

        Causal attention makes every real token (and so the pooled EOS) blind to the
        padding that follows it, so no padding mask is needed.
        """
        x = self.embeddings(input_ids=text_ids)
        x = self.encoder(inputs_embeds=x, is_causal=True).last_hidden_state
        return self.final_layer_norm(x)


class DualEncoder(nn.Module):
    """CLIP image and text towers with projections into a joint space.

    Args:
        vision_config: layer sizes of the image tower (``patch_size`` is read from it).
        text_config: layer sizes of the text tower (``vocab_size`` includes the mask token,
            ``max_position_embeddings`` is the text length).
        embed_dim: joint space size.
        image_size: (H, W) input images; each must be divisible by the patch size.
    """

    def __init__(
        self,
        vision_config: CLIPVisionConfig,
        text_config: CLIPTextConfig,
        embed_dim: int,
        image_size: tuple[int, int],
    ) -> None:
        super().__init__()
        p = vision_config.patch_size
        h, w = image_size
        if h % p or w % p:
            raise ValueError(
                f"model.image_size {tuple(image_size)} must be divisible by model.patch_size {p}"
            )
        self.image_size = (int(h), int(w))
        self.patch_size = int(p)
        self.grid = (h // p, w // p)
        self.embed_dim = int(embed_dim)
        self.vocab_size = int(text_config.vocab_size)
        self.text_length = int(text_config.max_position_embeddings)
        self.vision_model = VisionTower(vision_config, self.grid)
        self.text_model = TextTower(text_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_config.hidden_size, embed_dim, bias=False)
        self._init_weights()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _init_weights(self) -> None:
        # OpenAI CLIP's initialisation (model.py ``initialize_parameters``), for both towers:
        # residual-branch outputs scaled by (2 * layers)^-0.5 so the stream variance stays flat.
        t, v = self.text_model, self.vision_model
        nn.init.normal_(t.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(t.embeddings.position_embedding.weight, std=0.01)
        vw = v.config.hidden_size
        nn.init.normal_(v.embeddings.class_embedding, std=vw**-0.5)
        nn.init.normal_(v.embeddings.position_embedding.weight, std=vw**-0.5)
        nn.init.normal_(v.embeddings.patch_embedding.weight, std=0.02)
        for tower in (t, v):
            width, layers = tower.config.hidden_size, tower.config.num_hidden_layers
            init_clip_layers(tower.encoder.layers, width, layers, zero_mlp_bias=True)
        nn.init.normal_(self.visual_projection.weight, std=vw**-0.5)
        nn.init.normal_(self.text_projection.weight, std=t.config.hidden_size**-0.5)

    # ---- token level (for heads)

    def image_tokens(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """All image tokens in the joint space.

        Args:
            images: (B, 3, H, W) normalised images.
            keep: (B, K) patch indices to keep (the rest are removed before the encoder).

        Returns:
            (B, 1 + K, E) projected tokens; row 0 is the class token (the global feature).
        """
        return self.visual_projection(self.vision_model(images, keep))

    def text_tokens(self, text_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, E) projected text tokens (causal: token i sees 0..i)."""
        return self.text_projection(self.text_model(text_ids))

    # ---- global features

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) class-token features (not normalised)."""
        # Projecting the class token alone equals row 0 of ``image_tokens`` (per-token ops).
        return self.visual_projection(self.vision_model(images)[:, 0])

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, E) end-of-text features (not normalised)."""
        return self.text_projection(pool_eos(self.text_model(text_ids), text_mask))

    # ---- construction

    @classmethod
    def from_sizes(
        cls,
        vision: TowerSize,
        text: TowerSize,
        embed_dim: int,
        *,
        image_size: tuple[int, int],
        patch_size: int,
        text_length: int,
        vocab_size: int,
    ) -> DualEncoder:
        """A randomly initialised encoder of the given tower sizes."""
        vcfg = _tower_config(CLIPVisionConfig, vision, patch_size=patch_size, image_size=max(image_size))
        tcfg = _tower_config(CLIPTextConfig, text, vocab_size=vocab_size, max_position_embeddings=text_length)
        return cls(vcfg, tcfg, embed_dim, image_size)


# --------------------------------------------------------------------------- pretrained


_SKELETON: contextvars.ContextVar[bool] = contextvars.ContextVar("tpr_clip_skeleton", default=False)


@contextlib.contextmanager
def clip_skeleton() -> Iterator[None]:
    """Inside this context a ``model.pretrained`` directory needs only its ``config.json``: the
    towers get the checkpoint's sizes with untrained weights, for a state dict to overwrite
    (how an exported model rebuilds itself without the CLIP weights it started from)."""
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def check_clip_dir(path: str | Path) -> Path:
    """Check that ``path`` is a local Hugging Face CLIP directory, before any work starts.

    Args:
        path: the ``model.pretrained`` value.

    Returns:
        The directory as a Path.

    Raises:
        ValueError: naming the path and what is missing (directory, config.json with
            ``model_type: clip``, or a weights file).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"model.pretrained {path}: not a directory (expected a local Hugging Face CLIP directory)"
        )
    cfg_file = p / "config.json"
    not_clip = (
        f"model.pretrained {path}: not a Hugging Face CLIP directory (no config.json with model_type clip)"
    )
    if not cfg_file.is_file():
        raise ValueError(not_clip)
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"{not_clip}; {cfg_file} is not a JSON object") from None
    if model_type != "clip":
        raise ValueError(f"{not_clip}; {cfg_file} has model_type {model_type!r}")
    if not _SKELETON.get() and not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(
            f"model.pretrained {path}: CLIP config found but no weights ({' or '.join(_WEIGHT_FILES)})"
        )
    return p


def load_clip_dir(
    path: str | Path,
    *,
    image_size: tuple[int, int],
    patch_size: int,
    text_length: int,
    vocab_size: int,
    embed_dim: int | None = None,
) -> DualEncoder:
    """Build a :class:`DualEncoder` from a local Hugging Face CLIP directory.

    Tower sizes come from the checkpoint's config. The vision position embeddings are
    interpolated from the checkpoint's (square) grid to ``image_size / patch_size``; the
    text positions are cut to ``text_length``; the token embedding grows to
    ``vocab_size`` rows (the tokenizer's vocabulary incl. the mask token), the new rows
    set to the mean of the trained ones. Nothing is downloaded.

    Args:
        path: the CLIP directory (``config.json`` + ``model.safetensors``).
        image_size: (H, W) training images.
        patch_size: must equal the checkpoint's patch size.
        text_length: at most the checkpoint's text positions.
        vocab_size: tokenizer vocabulary size, at least the checkpoint's.
        embed_dim: ``model.embed_dim``; None or equal to the checkpoint's projection size.

    Returns:
        The encoder holding the checkpoint's weights.
    """
    p = check_clip_dir(path)
    if _SKELETON.get():
        clip = CLIPModel(CLIPConfig.from_pretrained(str(p), local_files_only=True))
    else:
        clip = CLIPModel.from_pretrained(str(p), local_files_only=True)
    cc, vc, tc = clip.config, clip.config.vision_config, clip.config.text_config
    if vc.patch_size != patch_size:
        raise ValueError(
            f"model.patch_size {patch_size} differs from the patch size {vc.patch_size} of model.pretrained {path}"
        )
    if embed_dim is not None and embed_dim != cc.projection_dim:
        raise ValueError(
            f"model.embed_dim {embed_dim} differs from the projection size {cc.projection_dim} "
            f"of model.pretrained {path}; leave model.embed_dim unset"
        )
    if text_length > tc.max_position_embeddings:
        raise ValueError(
            f"model.text_length {text_length} exceeds the {tc.max_position_embeddings} text positions "
            f"of model.pretrained {path}"
        )
    if vocab_size < tc.vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({vocab_size}) is smaller than the {tc.vocab_size} tokens of "
            f"model.pretrained {path}; use the CLIP tokenizer with a pretrained CLIP"
        )

    def tower(kind: type, c: CLIPVisionConfig | CLIPTextConfig, **extra: Any) -> Any:
        """A tower config of the checkpoint's sizes, norm epsilon and activation."""
        size = TowerSize(c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
        return _tower_config(
            kind, size, intermediate=c.intermediate_size, layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act,
            **extra,
        )  # fmt: skip

    vcfg = tower(CLIPVisionConfig, vc, patch_size=patch_size, image_size=max(image_size))
    tcfg = tower(CLIPTextConfig, tc, vocab_size=vocab_size, max_position_embeddings=text_length)
    enc = DualEncoder(vcfg, tcfg, cc.projection_dim, image_size)

    state = {
        k: v for k, v in clip.state_dict().items() if k != "logit_scale" and not k.endswith("position_ids")
    }
    old_side = vc.image_size // vc.patch_size
    key = "vision_model.embeddings.position_embedding.weight"
    state[key] = interpolate_pos_embed(state[key], (old_side, old_side), enc.grid)
    key = "text_model.embeddings.position_embedding.weight"
    state[key] = state[key][:text_length].clone()
    key = "text_model.embeddings.token_embedding.weight"
    tok = state[key]
    extra = vocab_size - tok.shape[0]
    if extra:
        # New ids (the mask token) start at the centre of the trained embeddings, so the
        # first masked captions look like "an average word" rather than noise.
        state[key] = torch.cat([tok, tok.mean(0, keepdim=True).expand(extra, -1)], dim=0)
    enc.load_state_dict(state, strict=True)
    return enc


def build_dual_encoder(model_cfg: ModelConfig, vocab_size: int) -> DualEncoder:
    """The dual encoder of ``model_cfg``: from ``model.pretrained`` if set, else the preset.

    With ``model.pretrained`` the tower sizes are the checkpoint's and ``model.preset``
    does not apply to the encoder.
    """
    h, w = model_cfg.image_size
    if model_cfg.pretrained is not None:
        return load_clip_dir(
            model_cfg.pretrained,
            image_size=(h, w),
            patch_size=model_cfg.patch_size,
            text_length=model_cfg.text_length,
            vocab_size=vocab_size,
            embed_dim=model_cfg.embed_dim,
        )
    preset = dual_preset(model_cfg.preset)
    return DualEncoder.from_sizes(
        preset.vision,
        preset.text,
        model_cfg.embed_dim or preset.embed_dim,
        image_size=(h, w),
        patch_size=model_cfg.patch_size,
        text_length=model_cfg.text_length,
        vocab_size=vocab_size,
    )
