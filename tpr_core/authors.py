"""Import released checkpoints into tpr's model folder: OpenAI CLIP, IRRA, FMFA and SEN (UIT).

Every source keeps OpenAI CLIP's parameter names for the encoder (IRRA, FMFA and SEN under
``base_model.``, as their ``model/build.py`` builds it with ``build_CLIP_from_openai_pretrained``);
tpr's dual encoder uses ``transformers``' CLIP names. The map, per residual block:
``attn.in_proj_weight`` / ``in_proj_bias`` split in three (q, k, v), ``attn.out_proj`` ->
``self_attn.out_proj``, ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``, ``mlp.c_fc``/``mlp.c_proj``
-> ``mlp.fc1``/``mlp.fc2``; the projections ``visual.proj`` and ``text_projection`` (width, embed)
become the transposed ``nn.Linear`` weights.

Heads, from the authors' ``model/build.py``:

- IRRA and FMFA (the same module names): ``classifier``, ``cross_attn``, ``cross_modal_transformer``,
  ``ln_pre_t``, ``ln_pre_i``, ``ln_post``, ``mlm_head.{dense,ln,fc}`` -> tpr's ``irr.*`` and ``classifier``.
- SEN: ``decoder_embed``, ``mask_token``, ``norm_1/2/4/6/7``, ``cross_attn_Text``,
  ``cross_modal_transformer_mae``, ``decoder_pred`` -> tpr's ``restorer.*``; what tpr's uit does
  not have is dropped and listed: the fixed ``decoder_pos_embed`` (tpr computes the same sin-cos
  table), the unused ``cross_attn_TextImage``, ``cross_attn_Image``, ``norm_3``, ``norm_5``, and
  the MLM / fuse heads of other loss settings.

Vocabulary. The authors' tokenizer (``utils/simple_tokenizer.py``) drops CLIP's last BPE merge
and appends ``<|mask|>``, ``<|startoftext|>``, ``<|endoftext|>``: 49408 ids, mask 49405, BOS and
EOS at CLIP's own 49406 and 49407. tpr's CLIP tokenizer keeps every CLIP id and appends its mask
at 49408. So the rows of the token embedding and of the MLM output layer are kept by id, and the
authors' mask row (49405) is copied to tpr's mask id; tpr's row 49405 (the merge the authors'
tokenizer cannot produce) keeps the same values. An OpenAI CLIP archive has no mask row: the
appended rows start at the mean of the trained ones, as ``load_clip_dir`` does.

Positions. An authors' checkpoint was trained on its own patch grid and must match the config's
(``model.image_size`` / ``model.patch_size``); OpenAI's square grid is resized bicubically as
``load_clip_dir`` resizes a Hugging Face CLIP (IRRA resizes bilinearly when it starts training).
Text positions are cut to ``model.text_length``.

Checkpoints are read with :func:`tpr_core.tensor_pickle.load_tensors` (tensors and plain
containers only). A source key that is neither mapped nor on the source's drop list, a tpr
parameter left without a value, and a shape that differs are errors naming the key.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tpr_core.config import ExperimentConfig
from tpr_core.tensor_pickle import ScriptObject, flatten_script_module, load_tensors

__all__ = ["SOURCES", "AuthorsImportError", "Imported", "import_checkpoint", "map_state_dict", "read_state_dict"]

# source -> tpr methods whose modules it fills
SOURCES: dict[str, tuple[str, ...]] = {
    "openai-clip": ("irra", "fmfa", "uit"),
    "irra": ("irra", "fmfa"),
    "fmfa": ("fmfa", "irra"),
    "sen": ("uit",),
}


class AuthorsImportError(ValueError):
    """A checkpoint that does not map onto the tpr model; the message names the key."""


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The flat state dict of a checkpoint: a TorchScript archive's tensor attributes, or the
    ``model`` / ``state_dict`` entry of a ``torch.save`` dict (a ``module.`` prefix removed)."""
    obj = load_tensors(path)
    if isinstance(obj, ScriptObject):
        return flatten_script_module(obj)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise AuthorsImportError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise AuthorsImportError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


# --------------------------------------------------------------------------- name rules

# A rule: source-name pattern, tpr-name template, and how the tensor changes.
Rule = tuple[str, str, str]


def _block_rules(src: str, dst: str) -> list[Rule]:
    """One OpenAI ``ResidualAttentionBlock`` stack (``src.resblocks.N``) onto ``CLIPEncoder`` layers."""
    s, d = re.escape(src) + r"\.resblocks\.(\d+)\.", dst + r".layers.\1."
    return [
        (s + r"attn\.in_proj_(weight|bias)", d + r"self_attn.{}_proj.\2", "qkv"),
        (s + r"attn\.out_proj\.(weight|bias)", d + r"self_attn.out_proj.\2", "copy"),
        (s + r"ln_1\.(weight|bias)", d + r"layer_norm1.\2", "copy"),
        (s + r"ln_2\.(weight|bias)", d + r"layer_norm2.\2", "copy"),
        (s + r"mlp\.c_fc\.(weight|bias)", d + r"mlp.fc1.\2", "copy"),
        (s + r"mlp\.c_proj\.(weight|bias)", d + r"mlp.fc2.\2", "copy"),
    ]


def _clip_rules(prefix: str) -> list[Rule]:
    p = re.escape(prefix)
    v, t = "encoder.vision_model.", "encoder.text_model."
    return [
        (p + r"visual\.conv1\.weight", v + "embeddings.patch_embedding.weight", "copy"),
        (p + r"visual\.class_embedding", v + "embeddings.class_embedding", "copy"),
        (p + r"visual\.positional_embedding", v + "embeddings.position_embedding.weight", "pos_image"),
        (p + r"visual\.ln_pre\.(weight|bias)", v + r"pre_layrnorm.\1", "copy"),
        (p + r"visual\.ln_post\.(weight|bias)", v + r"post_layernorm.\1", "copy"),
        (p + r"visual\.proj", "encoder.visual_projection.weight", "transpose"),
        *_block_rules(prefix + "visual.transformer", v + "encoder"),
        (p + r"token_embedding\.weight", t + "embeddings.token_embedding.weight", "vocab"),
        (p + r"positional_embedding", t + "embeddings.position_embedding.weight", "pos_text"),
        *_block_rules(prefix + "transformer", t + "encoder"),
        (p + r"ln_final\.(weight|bias)", t + r"final_layer_norm.\1", "copy"),
        (p + r"text_projection", "encoder.text_projection.weight", "transpose"),
    ]


_IRRA_HEADS: list[Rule] = [
    (r"classifier\.(weight|bias)", r"classifier.\1", "copy"),
    (r"cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", r"irr.cross_attn.\1", "copy"),
    *_block_rules("cross_modal_transformer", "irr.transformer"),
    (r"(ln_pre_t|ln_pre_i|ln_post)\.(weight|bias)", r"irr.\1.\2", "copy"),
    (r"mlm_head\.dense\.(weight|bias)", r"irr.mlm_head.0.\1", "copy"),
    (r"mlm_head\.ln\.(weight|bias)", r"irr.mlm_head.2.\1", "copy"),
    (r"mlm_head\.fc\.(weight|bias)", r"irr.mlm_head.3.\1", "vocab"),
]

_SEN_NORMS = {"1": "ln_image", "2": "ln_text", "4": "ln_q", "6": "ln_fused", "7": "norm"}
_SEN_HEADS: list[Rule] = [
    (r"classifier\.(weight|bias)", r"classifier.\1", "copy"),
    (r"decoder_embed\.(weight|bias)", r"restorer.embed.\1", "copy"),
    (r"mask_token", "restorer.mask_token", "copy"),
    *[(rf"norm_{n}\.(weight|bias)", rf"restorer.{name}.\1", "copy") for n, name in _SEN_NORMS.items()],
    (r"cross_attn_Text\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", r"restorer.cross_attn.\1", "copy"),
    *_block_rules("cross_modal_transformer_mae", "restorer.transformer"),
    (r"decoder_pred\.(weight|bias)", r"restorer.pred.\1", "copy"),
]

# Source keys with no counterpart in tpr's module, left out on purpose (listed in the report).
_DROPPED: dict[str, str] = {
    # OpenAI's archive: the logit temperature, size attributes and the causal mask tpr builds itself.
    "openai-clip": r"logit_scale|(.*\.)?(input_resolution|context_length|vocab_size|output_dim)|.*\.attn_mask",
    "irra": r"base_model\.logit_scale|.*\.attn_mask",
    "sen": (
        r"base_model\.logit_scale|.*\.attn_mask|decoder_pos_embed|cross_attn_TextImage\..*|cross_attn_Image\..*"
        r"|norm_[35]\..*|cross_attn_mlm\..*|cross_modal_transformer_mlm\..*|ln_pre_[ti]\..*|ln_post\..*"
        r"|mlm_head\..*|fuse_head\..*|norm_image\..*|norm_text\..*"
    ),
}
_DROPPED["fmfa"] = _DROPPED["irra"]

_RULES: dict[str, list[Rule]] = {
    "openai-clip": _clip_rules(""),
    "irra": _clip_rules("base_model.") + _IRRA_HEADS,
    "fmfa": _clip_rules("base_model.") + _IRRA_HEADS,
    "sen": _clip_rules("base_model.") + _SEN_HEADS,
}


# --------------------------------------------------------------------------- tensor changes


@dataclass
class _Target:
    """What the tensor changes need to know about the tpr model."""

    grid: tuple[int, int]
    text_length: int
    tokenizer: Any
    authors_vocab: bool  # the authors' 49408-id layout with its mask three ids from the end


def _vocab_rows(key: str, t: Tensor, tgt: _Target) -> Tensor:
    tok, n = tgt.tokenizer, t.shape[0]
    if not tgt.authors_vocab:
        if tok.vocab_size < n:
            raise AuthorsImportError(f"{key}: {n} vocabulary rows, more than the tokenizer's {tok.vocab_size}")
        return torch.cat([t, t.mean(0, keepdim=True).expand(tok.vocab_size - n, *t.shape[1:])], dim=0)
    want = {"bos_id": n - 2, "eos_id": n - 1, "mask_id": n, "vocab_size": n + 1}
    got = {k: int(getattr(tok, k)) for k in want}
    if got != want:
        raise AuthorsImportError(
            f"{key}: {n} rows in the authors' vocabulary (mask {n - 3}, BOS {n - 2}, EOS {n - 1}) need the "
            f"CLIP tokenizer with its mask appended ({want}); this tokenizer has {got}"
        )
    return torch.cat([t, t[n - 3 : n - 2]], dim=0)  # the authors' mask row -> tpr's mask id


def _change(kind: str, key: str, t: Tensor, tgt: _Target) -> Tensor:
    from tpr_core.models.dual_encoder import interpolate_pos_embed

    if kind == "transpose":
        return t.t()
    if kind == "vocab":
        return _vocab_rows(key, t, tgt)
    if kind == "pos_text":
        if t.shape[0] < tgt.text_length:
            raise AuthorsImportError(f"{key}: {t.shape[0]} text positions, model.text_length is {tgt.text_length}")
        return t[: tgt.text_length]
    if kind == "pos_image":
        gh, gw = tgt.grid
        if t.shape[0] == 1 + gh * gw:
            return t
        side = round((t.shape[0] - 1) ** 0.5)
        if tgt.authors_vocab or side * side + 1 != t.shape[0]:
            raise AuthorsImportError(
                f"{key}: {t.shape[0]} positions do not fit the {gh}x{gw} patch grid of model.image_size / "
                "model.patch_size (the grid the checkpoint was trained on must be configured)"
            )
        return interpolate_pos_embed(t.float(), (side, side), tgt.grid)
    return t


def _apply(rule: Rule, m: re.Match[str], t: Tensor, tgt: _Target, key: str) -> list[tuple[str, Tensor]]:
    _, template, kind = rule
    name = m.expand(template)
    if kind == "qkv":
        if t.shape[0] % 3:
            raise AuthorsImportError(f"{key}: {tuple(t.shape)} does not split into q, k, v")
        return [(name.format(part), chunk) for part, chunk in zip("qkv", t.chunk(3, dim=0), strict=True)]
    return [(name, _change(kind, key, t, tgt))]


@dataclass
class Mapped:
    """A mapped state dict and what was left out."""

    state: dict[str, Tensor]
    dropped: list[str] = field(default_factory=list)


def map_state_dict(source: str, state: dict[str, Tensor], tgt: _Target) -> Mapped:
    """Rename and reshape a source state dict into tpr's names (see the module notes).

    Raises:
        AuthorsImportError: a source key that no rule maps and the source does not drop.
    """
    rules = [(re.compile(r[0]), r) for r in _RULES[source]]
    drop = re.compile(_DROPPED[source])
    out = Mapped({})
    unmapped: list[str] = []
    for key, t in state.items():
        for pattern, rule in rules:
            m = pattern.fullmatch(key)
            if m:
                out.state.update(_apply(rule, m, t, tgt, key))
                break
        else:
            (out.dropped if drop.fullmatch(key) else unmapped).append(key)
    if unmapped:
        raise AuthorsImportError(
            f"{len(unmapped)} keys of the {source} checkpoint have no place in tpr's model: {_names(unmapped)}"
        )
    return out


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------- sizes


def clip_config_of(state: dict[str, Tensor], prefix: str, image_side: int) -> dict[str, Any]:
    """A Hugging Face ``CLIPConfig`` dict of the checkpoint's tower sizes (heads = width / 64, as
    OpenAI's ``build_model`` and the authors' copies of it count them)."""

    def get(name: str) -> Tensor:
        try:
            return state[prefix + name]
        except KeyError:
            raise AuthorsImportError(f"checkpoint has no {prefix + name!r}; is it the right --format?") from None

    def layers(stack: str) -> int:
        pat = re.compile(re.escape(prefix + stack) + r"\.resblocks\.(\d+)\.attn\.in_proj_weight")
        return len({m.group(1) for k in state if (m := pat.fullmatch(k))})

    def tower(width: int, depth: int, **extra: Any) -> dict[str, Any]:
        return {
            "hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": max(1, width // 64),
            "intermediate_size": 4 * width, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **extra,
        }  # fmt: skip

    conv = get("visual.conv1.weight")
    text_width = get("ln_final.weight").shape[0]
    return {
        "model_type": "clip",
        "projection_dim": int(get("text_projection").shape[1]),
        "vision_config": tower(
            int(conv.shape[0]), layers("visual.transformer"), patch_size=int(conv.shape[-1]), image_size=image_side
        ),
        "text_config": tower(
            int(text_width), layers("transformer"), vocab_size=int(get("token_embedding.weight").shape[0]),
            max_position_embeddings=int(get("positional_embedding").shape[0]),
        ),  # fmt: skip
    }


# --------------------------------------------------------------------------- import


@dataclass
class Imported:
    """The written folder and the source keys left out."""

    path: Path
    dropped: list[str]
    num_classes: int


def _check_method(source: str, cfg: ExperimentConfig) -> None:
    if source not in SOURCES:
        raise AuthorsImportError(f"unknown source format {source!r}; known: {sorted(SOURCES)}")
    if cfg.method not in SOURCES[source]:
        raise AuthorsImportError(
            f"a {source} checkpoint fills method {' or '.join(SOURCES[source])}, the config's method is {cfg.method!r}"
        )


def build_imported_model(
    source: str, state: dict[str, Tensor], cfg: ExperimentConfig, tokenizer: Any, num_classes: int | None = None
) -> tuple[torch.nn.Module, Mapped, dict[str, Any], int]:
    """The tpr module of ``cfg`` holding a source checkpoint's weights.

    Returns:
        ``(model, mapped, clip_config, num_classes)``; the model is in eval mode.
    """
    from tpr_core.models import build_method
    from tpr_core.models.dual_encoder import clip_skeleton

    _check_method(source, cfg)
    prefix = "" if source == "openai-clip" else "base_model."
    clip_cfg = clip_config_of(state, prefix, max(cfg.model.image_size))
    patch = clip_cfg["vision_config"]["patch_size"]
    if patch != cfg.model.patch_size:
        raise AuthorsImportError(
            f"{prefix}visual.conv1.weight: patch size {patch}, the config's model.patch_size is {cfg.model.patch_size}"
        )
    if "classifier.weight" in state:
        num_classes = int(state["classifier.weight"].shape[0])
    num_classes = int(num_classes or 1)
    with tempfile.TemporaryDirectory(prefix="tpr-import-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(clip_cfg))
        model_cfg = cfg.model.model_copy(update={"pretrained": tmp, "embed_dim": None})
        # Seeded: parts the source has no weights for (an OpenAI CLIP's heads) are the same every import.
        with clip_skeleton(), torch.random.fork_rng():
            torch.manual_seed(cfg.train.seed)
            model = build_method(cfg.model_copy(update={"model": model_cfg}), num_classes, tokenizer)
    enc = model.encoder
    tgt = _Target(enc.grid, enc.text_length, tokenizer, authors_vocab=source != "openai-clip")
    mapped = map_state_dict(source, state, tgt)
    own = model.state_dict()
    extra = [k for k in mapped.state if k not in own]
    if extra:
        raise AuthorsImportError(f"mapped keys missing from tpr's {cfg.method} model: {_names(extra)}")
    for key, t in mapped.state.items():
        if tuple(t.shape) != tuple(own[key].shape):
            raise AuthorsImportError(
                f"{key}: the checkpoint gives shape {tuple(t.shape)}, tpr's {cfg.method} model has "
                f"{tuple(own[key].shape)} (check model.cross_depth / restore_depth / image_size)"
            )
    required = [k for k in own if source != "openai-clip" or k.startswith("encoder.")]
    missing = [k for k in required if k not in mapped.state]
    if missing:
        raise AuthorsImportError(f"the {source} checkpoint has no value for {len(missing)} keys: {_names(missing)}")
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in mapped.state.items()}, strict=False)
    return model.eval(), mapped, clip_cfg, num_classes


def import_checkpoint(
    src: str | Path,
    source: str,
    cfg: ExperimentConfig,
    tokenizer: Any,
    out: str | Path,
    num_classes: int | None = None,
) -> Imported:
    """Convert an authors' (or OpenAI's) checkpoint into a tpr model folder.

    Args:
        src: ``ViT-B-16.pt`` (``openai-clip``) or ``best.pth`` (``irra``, ``fmfa``, ``sen``).
        source: one of :data:`SOURCES`.
        cfg: the experiment config the weights belong to (method, image size, depths).
        tokenizer: the CLIP tokenizer with tpr's appended mask token.
        out: the model folder to write (replaced atomically).
        num_classes: classifier size when the source has no classifier (``openai-clip``).

    Returns:
        The folder, the dropped source keys and the classifier size.
    """
    from tpr_core.export import save_exported

    src = Path(src)
    _check_method(source, cfg)
    state = read_state_dict(src)
    model, mapped, clip_cfg, n = build_imported_model(source, state, cfg, tokenizer, num_classes)
    saved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(src.resolve()), "embed_dim": None})})
    extra = {"imported_from": str(src.resolve()), "source_format": source, "dropped_keys": mapped.dropped}
    path = save_exported(out, model.state_dict(), saved, tokenizer, {}, n, extra=extra, clip_config=clip_cfg)
    return Imported(path=path, dropped=mapped.dropped, num_classes=n)

