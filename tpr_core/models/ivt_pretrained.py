"""IVT's pretrained start: a timm ViT for the vision side, a Hugging Face BERT for the text side.

What IVT's code loads (``model/backbones/vit_vl.py``, ``UVT_Bert_IMG_TXT_MASK.load_param_hybrid``,
called from ``model/make_model_vl.py`` with ``jx_vit_base_p16_224-80ecf9dd.pth`` and
``bert-base-uncased``):

- from the ViT (every key but ``head.*``): ``patch_embed.proj``, ``cls_token``, ``pos_embed``
  (resized *bilinearly* over the 2-D grid to the new patch grid, class position kept),
  ``blocks.N.{norm1, attn.qkv, attn.proj, norm2}`` into the shared block, ``blocks.N.mlp.*``
  into the **image** FFN only (``mlp_vis``), and the final ``norm``;
- from BERT: all of ``embeddings.*`` (word, position and token-type embeddings, the embedding
  layernorm) and, per layer N, the feed-forward network ``encoder.layer.N.intermediate.dense``
  -> ``blocks.N.mlp_txt.fc1`` and ``encoder.layer.N.output.dense`` -> ``blocks.N.mlp_txt.fc2``
  into the **text** FFN; BERT's attention and layer norms are not used;
- IVT's image ``type_embed`` is loaded from neither (it keeps its random start).

The same mapping here, onto :class:`~tpr_core.models.shared_encoder.SharedEncoder`:

==============================================  =========================================
timm ViT (``model.pretrained``)                  shared encoder
==============================================  =========================================
``patch_embed.proj.{weight,bias}``               ``patch_embed.proj.*`` (any stride)
``cls_token``                                    ``image_cls``
``pos_embed`` (1, 1 + g*g, W)                    ``image_pos`` (bilinear to the grid)
``blocks.N.norm1/norm2/attn.qkv/attn.proj``      ``blocks.N.*`` (shared)
``blocks.N.mlp.fc1/fc2``                         ``blocks.N.mlp.image.fc1/fc2``
``norm``                                         ``norm``
BERT (``model.pretrained_text``)
``embeddings.word_embeddings``                   ``token_embed`` (extra tokenizer rows: mean)
``embeddings.position_embeddings[:L]``           ``text_pos``
``embeddings.token_type_embeddings[0]``          ``text_type``
``embeddings.LayerNorm``                         ``text_norm``
``encoder.layer.N.intermediate.dense``           ``blocks.N.mlp.text.fc1``
``encoder.layer.N.output.dense``                 ``blocks.N.mlp.text.fc2``
==============================================  =========================================

Nothing is downloaded: both are local files. The encoder's sizes come from ``model.preset``;
a checkpoint of other sizes is an error naming the file and what differs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tpr_core.config import ModelConfig
from tpr_core.models.dual_encoder import interpolate_pos_embed
from tpr_core.models.shared_encoder import BERT_LN_EPS, SharedEncoder

__all__ = [
    "BERT_WEIGHT_FILES",
    "VIT_WEIGHTS_FILE",
    "check_bert_dir",
    "check_bert_tokenizer",
    "check_ivt_pretrained",
    "load_bert",
    "load_vit",
    "resize_pos_embed",
    "vit_file",
]

VIT_WEIGHTS_FILE = "model.safetensors"  # timm's Hugging Face layout (timm/vit_base_patch16_224.*)
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
BERT_VOCAB_FILE = "vocab.txt"
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")


# --------------------------------------------------------------------------- checks


def vit_file(path: str | Path) -> Path:
    """The timm ViT weights file of ``model.pretrained``: the file itself, or ``path/model.safetensors``.

    Raises:
        ValueError: naming the missing file, or a file that is not ``.safetensors``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / VIT_WEIGHTS_FILE
        if not f.is_file():
            raise ValueError(f"model.pretrained {path}: no timm ViT weights file {f}")
        return f
    if not p.is_file():
        raise ValueError(
            f"model.pretrained {path}: file not found (expected a timm ViT .safetensors file "
            f"or a folder holding {VIT_WEIGHTS_FILE})"
        )
    if p.suffix != ".safetensors":
        raise ValueError(f"model.pretrained {path}: not a .safetensors file (timm ViT weights)")
    return p


def check_bert_dir(path: str | Path) -> Path:
    """Check that ``path`` is a local Hugging Face BERT folder, before any work starts.

    Returns:
        The folder as a Path.

    Raises:
        ValueError: naming the path and what is missing (folder, ``config.json`` with
            ``model_type: bert``, a weights file, ``vocab.txt``).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"model.pretrained_text {path}: not a directory (expected a local Hugging Face BERT folder)"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model.pretrained_text {path}: no BERT config file {cfg_file}")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"model.pretrained_text {path}: {cfg_file} is not a JSON object") from None
    if model_type != "bert":
        raise ValueError(
            f"model.pretrained_text {path}: {cfg_file} has model_type {model_type!r}, not 'bert'"
        )
    if not any((p / f).is_file() for f in BERT_WEIGHT_FILES):
        raise ValueError(
            f"model.pretrained_text {path}: no BERT weights file ({' or '.join(str(p / f) for f in BERT_WEIGHT_FILES)})"
        )
    if not (p / BERT_VOCAB_FILE).is_file():
        raise ValueError(f"model.pretrained_text {path}: no tokenizer vocabulary {p / BERT_VOCAB_FILE}")
    return p


def check_ivt_pretrained(model_cfg: ModelConfig) -> None:
    """File checks of ``model.pretrained`` / ``model.pretrained_text`` for method ivt (a preflight)."""
    if model_cfg.pretrained is not None:
        vit_file(model_cfg.pretrained)
    if model_cfg.pretrained_text is not None:
        check_bert_dir(model_cfg.pretrained_text)


def _bert_vocab(path: Path) -> dict[str, int]:
    with (path / BERT_VOCAB_FILE).open(encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def check_bert_tokenizer(tokenizer: Any, path: str | Path) -> None:
    """The run's tokenizer must be the BERT folder's: same ``[CLS]``/``[SEP]``/``[PAD]`` ids.

    Compared where the tokenizer has the attribute (``bos_id``, ``eos_id``, ``pad_id``); its
    ``vocab_size`` must cover BERT's vocabulary. A tokenizer trained on the captions (BPE)
    fails here instead of indexing BERT's word embeddings with unrelated ids.
    """
    p = check_bert_dir(path)
    vocab = _bert_vocab(p)
    want = {"bos_id": "[CLS]", "eos_id": "[SEP]", "pad_id": "[PAD]"}
    for attr, token in want.items():
        got = getattr(tokenizer, attr, None)
        if got is not None and token in vocab and int(got) != vocab[token]:
            raise ValueError(
                f"model.pretrained_text {path}: the tokenizer's {attr} is {got} but {p / BERT_VOCAB_FILE} has "
                f"{token} at {vocab[token]}; an ivt run from BERT needs that folder's WordPiece tokenizer"
            )
    if int(tokenizer.vocab_size) < len(vocab):
        raise ValueError(
            f"model.pretrained_text {path}: tokenizer vocabulary ({tokenizer.vocab_size}) is smaller than the "
            f"{len(vocab)} tokens of {p / BERT_VOCAB_FILE}"
        )


# --------------------------------------------------------------------------- positions


def resize_pos_embed(
    pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bilinear"
) -> Tensor:
    """Resample ViT position embeddings to another patch grid, as IVT's ``resize_pos_embed``.

    The class position (row 0) is kept; the patch positions are laid out on their 2-D grid
    and resized with ``F.interpolate(mode, align_corners=False)`` (IVT: bilinear). An unchanged
    grid returns an exact copy.

    Args:
        pos: (1 + gh*gw, D) class position then patch positions, row-major.
        old_grid: (gh, gw) of ``pos``.
        new_grid: (gh', gw').
        mode: ``bilinear`` (IVT) or ``bicubic``.

    Returns:
        (1 + gh'*gw', D), same dtype as ``pos``.
    """
    return interpolate_pos_embed(pos, old_grid, new_grid, mode)


# --------------------------------------------------------------------------- loading


def _copy(dst: Tensor, src: Tensor, what: str, origin: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"{origin}: {what} has shape {tuple(src.shape)}, the shared encoder (model.preset) needs {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def load_vit(enc: SharedEncoder, path: str | Path) -> None:
    """Copy a timm ViT checkpoint (safetensors) into ``enc`` (see the module table).

    Args:
        enc: the shared encoder (sizes from the preset).
        path: ``model.pretrained``: a ``.safetensors`` file or a folder with ``model.safetensors``.

    Raises:
        ValueError: a missing file, an unknown key (another ViT variant), or sizes that
            differ from the encoder's, each naming the file.
    """
    from safetensors.torch import load_file

    f = vit_file(path)
    origin = f"model.pretrained {f}"
    state = load_file(str(f), device="cpu")
    depth = len(enc.blocks)
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    expected |= {
        f"blocks.{i}.{part}.{wb}" for i in range(depth) for part in _BLOCK_PARTS for wb in ("weight", "bias")
    }
    present = {k for k in state if not k.startswith("head.")}  # IVT skips the classifier ('head')
    missing, extra = sorted(expected - present), sorted(present - expected)
    if extra:
        deeper = sorted({int(m.group(1)) for k in extra if (m := _BLOCK_KEY.match(k))})
        if deeper:
            raise ValueError(
                f"{origin}: the checkpoint has blocks up to {deeper[-1]}, the shared encoder {depth} (model.preset)"
            )
        raise ValueError(
            f"{origin}: keys a plain timm ViT does not have: {extra[:5]} (unsupported ViT variant)"
        )
    if missing:
        raise ValueError(f"{origin}: missing keys {missing[:5]} (not a timm ViT state dict of this depth)")

    w = state["cls_token"].shape[-1]
    if w != enc.width:
        raise ValueError(f"{origin}: width {w}, the shared encoder's (model.preset) is {enc.width}")
    kernel = tuple(state["patch_embed.proj.weight"].shape[-2:])
    if kernel != (enc.patch_embed.patch_size,) * 2:
        raise ValueError(f"{origin}: patch size {kernel}, model.patch_size is {enc.patch_embed.patch_size}")
    pos = state["pos_embed"].reshape(-1, w)  # (1 + g*g, W)
    side = round((pos.shape[0] - 1) ** 0.5)
    if side * side != pos.shape[0] - 1:
        raise ValueError(f"{origin}: pos_embed has {pos.shape[0] - 1} patch rows, not a square grid")

    _copy(enc.patch_embed.proj.weight, state["patch_embed.proj.weight"], "patch_embed.proj.weight", origin)
    _copy(enc.patch_embed.proj.bias, state["patch_embed.proj.bias"], "patch_embed.proj.bias", origin)
    _copy(enc.image_cls, state["cls_token"].reshape(1, 1, w), "cls_token", origin)
    _copy(enc.image_pos[0], resize_pos_embed(pos, (side, side), enc.grid), "pos_embed", origin)
    for i, blk in enumerate(enc.blocks):
        mods = {
            "norm1": blk.norm1,
            "attn.qkv": blk.attn.qkv,
            "attn.proj": blk.attn.proj,
            "norm2": blk.norm2,
            "mlp.fc1": blk.mlp["image"].fc1,
            "mlp.fc2": blk.mlp["image"].fc2,
        }
        for part, mod in mods.items():
            for wb in ("weight", "bias"):
                key = f"blocks.{i}.{part}.{wb}"
                _copy(getattr(mod, wb), state[key], key, origin)
    _copy(enc.norm.weight, state["norm.weight"], "norm.weight", origin)
    _copy(enc.norm.bias, state["norm.bias"], "norm.bias", origin)


def load_bert(enc: SharedEncoder, path: str | Path) -> None:
    """Copy a local Hugging Face BERT's embeddings and feed-forward networks into ``enc``.

    BERT's word-embedding rows go to the first ids of ``token_embed`` (the tokenizer must be
    BERT's: see :func:`check_bert_tokenizer`); tokenizer ids beyond BERT's vocabulary start
    at the mean of BERT's rows. Positions are cut to ``model.text_length``.

    Raises:
        ValueError: a missing file, or sizes that differ from the encoder's, naming the folder.
    """
    from transformers import BertConfig, BertModel

    p = check_bert_dir(path)
    origin = f"model.pretrained_text {p}"
    cfg = BertConfig.from_pretrained(str(p), local_files_only=True)
    mlp = enc.blocks[0].mlp["text"].fc1.out_features
    checks = [
        ("hidden_size", cfg.hidden_size, enc.width),
        ("num_hidden_layers", cfg.num_hidden_layers, len(enc.blocks)),
        ("intermediate_size", cfg.intermediate_size, mlp),
        ("hidden_act", cfg.hidden_act, "gelu"),
        ("layer_norm_eps", cfg.layer_norm_eps, BERT_LN_EPS),
    ]
    for field, got, want in checks:
        if got != want:
            raise ValueError(
                f"{origin}: config.json {field} is {got!r}, the shared encoder (model.preset) needs {want!r}"
            )
    if cfg.max_position_embeddings < enc.text_length:
        raise ValueError(
            f"{origin}: {cfg.max_position_embeddings} positions, fewer than model.text_length {enc.text_length}"
        )
    vocab = enc.token_embed.num_embeddings
    if cfg.vocab_size > vocab:
        raise ValueError(
            f"{origin}: {cfg.vocab_size} word embeddings, more than the tokenizer's {vocab} ids; "
            "use that folder's tokenizer"
        )
    bert = BertModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False)
    state = bert.state_dict()
    words = state["embeddings.word_embeddings.weight"]  # (V_bert, W)
    extra = vocab - words.shape[0]
    if extra:
        words = torch.cat([words, words.mean(0, keepdim=True).expand(extra, -1)], dim=0)
    _copy(enc.token_embed.weight, words, "embeddings.word_embeddings.weight", origin)
    _copy(
        enc.text_pos[0],
        state["embeddings.position_embeddings.weight"][: enc.text_length],
        "embeddings.position_embeddings.weight",
        origin,
    )
    _copy(
        enc.text_type[0, 0],
        state["embeddings.token_type_embeddings.weight"][0],
        "token_type_embeddings",
        origin,
    )
    _copy(enc.text_norm.weight, state["embeddings.LayerNorm.weight"], "embeddings.LayerNorm.weight", origin)
    _copy(enc.text_norm.bias, state["embeddings.LayerNorm.bias"], "embeddings.LayerNorm.bias", origin)
    for i, blk in enumerate(enc.blocks):
        ffn = blk.mlp["text"]
        for src, dst in (("intermediate.dense", ffn.fc1), ("output.dense", ffn.fc2)):
            for wb in ("weight", "bias"):
                key = f"encoder.layer.{i}.{src}.{wb}"
                _copy(getattr(dst, wb), state[key], key, origin)
