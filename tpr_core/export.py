"""The consolidated model folder: everything needed to rebuild a trained model, nothing pickled.

Layout (format version 2)::

    <out_dir>/
        model.safetensors   the full state dict (CPU, contiguous; safetensors, never pickle)
        config.json         what ``from_pretrained`` reads: {"model_type": "tpr", "method",
                            "num_classes", "vocab_size", "format_version"} (``tpr_core.hub``)
        config.yaml         the resolved ExperimentConfig (``tpr_core.config.dump_config``)
        tokenizer.json      ``Tokenizer.save_for_transformers`` output: also tpr_tokenizer.json,
                            tokenizer_config.json and special_tokens_map.json, so
                            ``PreTrainedTokenizerFast.from_pretrained(<out_dir>)`` loads it
        clip/config.json    only for a dual-encoder model (irra, fmfa, uit) started from
                            ``model.pretrained``: that CLIP's config (its tower sizes), so
                            loading needs no CLIP directory. An ivt model's sizes come from
                            its preset, so it keeps nothing of its ViT / BERT checkpoints
        metrics.json        metrics of the exported weights, e.g. {"val/R1": 41.2, ...}
        export.json         {"format": "tpr-export", "format_version": 2, "method", "num_classes",
                             "dataset_manifest_hash", "weights_sha256", "num_tensors",
                             "num_parameters", "created", "extra": {...}}

Format version 1 (written before) had no config.json and kept the tokenizer in ``tokenizer/``;
it still loads.

``extra`` is free-form JSON given by the writer; keys the pipelines read are
``dataset_manifest_hash`` (or ``manifest_hash``; copied to the top level), ``git_commit``
and ``run_name``.

The folder is written into a temporary sibling and renamed into place, so a reader never
sees half a model. Loading rebuilds the module with ``build_method`` and fills it with
``safetensors.torch.load_file``; the weights file is checked against its recorded SHA-256.
An ivt model is rebuilt with ``model.pretrained`` and ``model.pretrained_text`` unset (all
its weights are in the folder), so it loads where the ViT and BERT files are absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpr_core.config import ExperimentConfig, dump_config, read_yaml
from tpr_core.experiment import config_from_dict

FORMAT_NAME = "tpr-export"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
HUB_CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CLIP_CONFIG_DIR = "clip"
METRICS_FILE = "metrics.json"
INFO_FILE = "export.json"


class ExportError(ValueError):
    """An exported model folder that cannot be written or read; the message names the file and field."""


@dataclass
class Exported:
    """A loaded model folder.

    Attributes:
        model: the method module, weights loaded, in eval mode, on the requested device.
        tokenizer: the tokenizer saved with it.
        cfg: the resolved config it was trained with.
        metrics: ``metrics.json``.
        info: ``export.json``.
        path: the folder it was read from.
        clip_config: ``clip/config.json`` when the folder has one (a dual encoder's CLIP sizes).
    """

    model: nn.Module
    tokenizer: Any
    cfg: ExperimentConfig
    metrics: dict[str, float]
    info: dict[str, Any]
    path: Path
    clip_config: dict[str, Any] | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"state_dict[{key!r}] is a {type(t).__name__}, not a tensor")
        # A private copy: safetensors refuses tensors that share storage (tied weights).
        out[key] = t.detach().to("cpu", copy=True).contiguous()
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_exported(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg: ExperimentConfig,
    tokenizer: Any,
    metrics: dict[str, float],
    num_classes: int,
    extra: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
) -> Path:
    """Write a consolidated model folder atomically (temporary sibling, then rename).

    An existing folder at ``out_dir`` is replaced.

    Args:
        out_dir: Destination folder.
        state_dict: Full (consolidated) state dict of the module ``build_method(cfg, ...)`` builds.
        cfg: Resolved experiment config.
        tokenizer: ``tpr_core.data.tokenizer.Tokenizer`` used in training.
        metrics: Metrics of these weights (e.g. ``{"val/R1": 41.2}``); JSON numbers.
        num_classes: Identity-classifier size (number of training identities).
        extra: Free-form JSON metadata (``dataset_manifest_hash``, ``git_commit``, ...).
        clip_config: the CLIP config of a dual encoder, written as ``clip/config.json`` instead of
            the one in ``model.pretrained`` (an imported checkpoint has no CLIP directory).

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    from tpr_core.models import method_spec

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = _cpu_tensors(state_dict)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": cfg.method})
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        tokenizer.save_for_transformers(tmp)
        hub = {"model_type": "tpr", "format_version": FORMAT_VERSION, "method": cfg.method,
               "num_classes": int(num_classes), "vocab_size": int(tokenizer.vocab_size)}  # fmt: skip
        (tmp / HUB_CONFIG_FILE).write_text(json.dumps(hub, indent=2) + "\n")
        if clip_config is not None:
            (tmp / CLIP_CONFIG_DIR).mkdir()
            (tmp / CLIP_CONFIG_DIR / "config.json").write_text(json.dumps(clip_config, indent=2) + "\n")
        elif cfg.model.pretrained is not None and method_spec(cfg.method).encoder == "dual":
            # The tower sizes of a model started from CLIP weights come from that CLIP's
            # config: keep it, so the folder loads without the original CLIP directory.
            (tmp / CLIP_CONFIG_DIR).mkdir()
            shutil.copy2(Path(cfg.model.pretrained) / "config.json", tmp / CLIP_CONFIG_DIR / "config.json")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": cfg.method,
            "num_classes": int(num_classes),
            "dataset_manifest_hash": extra.get("dataset_manifest_hash") or extra.get("manifest_hash"),
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            "num_tensors": len(tensors),
            "num_parameters": int(sum(t.numel() for t in tensors.values())),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "extra": extra,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
        if out.exists():
            # Directories cannot be replaced in one rename: move the old one aside first.
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_info(path: str | Path) -> dict[str, Any]:
    """``export.json`` of a model folder, checked for format name and version."""
    p = Path(path) / INFO_FILE
    if not p.is_file():
        raise ExportError(f"not an exported model folder: {p} is missing")
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{p} is not valid JSON: {e}") from None
    if info.get("format") != FORMAT_NAME:
        raise ExportError(f"{p}: field 'format' is {info.get('format')!r}, expected {FORMAT_NAME!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ExportError(
            f"{p}: field 'format_version' is {version!r}; this tpr reads up to {FORMAT_VERSION}"
        )
    for field in ("method", "num_classes"):
        if field not in info:
            raise ExportError(f"{p}: missing field {field!r}")
    return info


def read_config(path: str | Path) -> ExperimentConfig:
    """The resolved config of a model folder (validated)."""
    p = Path(path) / CONFIG_FILE
    return config_from_dict(read_yaml(p, "exported model's config", ExportError), str(p))


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> Exported:
    """Rebuild the model of a folder written by :func:`save_exported` (no unpickling).

    Args:
        path: The model folder.
        device: Where to put the model.

    Returns:
        An :class:`Exported` with the model in eval mode.

    Raises:
        ExportError: A file is missing or malformed, the weights do not match their recorded
            hash, or the state dict does not fit the rebuilt module (keys named).
    """
    from safetensors.torch import load_file

    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.models import build_method, method_spec
    from tpr_core.models.dual_encoder import clip_skeleton

    root = Path(path)
    info = read_info(root)
    cfg = read_config(root)
    if cfg.method != info["method"]:
        raise ExportError(
            f"{root / INFO_FILE}: field 'method' is {info['method']!r} but {root / CONFIG_FILE} says {cfg.method!r}"
        )
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"exported model folder has no weights: {weights} is missing")
    want = info.get("weights_sha256")
    if want and _sha256(weights) != want:
        raise ExportError(f"{weights}: SHA-256 differs from field 'weights_sha256' of {root / INFO_FILE}")
    metrics_path = root / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    # Format 1 kept the tokenizer in its own folder; format 2 at the top, for transformers.
    tokenizer = Tokenizer.load(root / TOKENIZER_DIR if info["format_version"] < 2 else root)
    clip_file = root / CLIP_CONFIG_DIR / "config.json"
    clip_config = json.loads(clip_file.read_text()) if clip_file.is_file() else None

    saved_cfg, skeleton = cfg, contextlib.nullcontext()
    if method_spec(cfg.method).encoder == "shared":
        # The shared encoder's sizes are the preset's; its ViT / BERT starting weights are
        # replaced by the folder's below, so the checkpoint files are neither read nor needed
        # (nor is the tokenizer checked against BERT's vocab.txt: it is the one saved here).
        if cfg.model.pretrained is not None or cfg.model.pretrained_text is not None:
            model_cfg = cfg.model.model_copy(update={"pretrained": None, "pretrained_text": None})
            cfg = cfg.model_copy(update={"model": model_cfg})
    elif cfg.model.pretrained is not None:
        # The towers' sizes come from the CLIP config kept in the folder; weights come below.
        if (root / CLIP_CONFIG_DIR / "config.json").is_file():
            model_cfg = cfg.model.model_copy(update={"pretrained": str(root / CLIP_CONFIG_DIR)})
            cfg = cfg.model_copy(update={"model": model_cfg})
            skeleton = clip_skeleton()
        elif not Path(cfg.model.pretrained).is_dir():  # a folder written before the config was kept
            raise ExportError(
                f"{root / CONFIG_FILE}: field model.pretrained {cfg.model.pretrained!r} is not a directory here "
                f"and the folder has no {CLIP_CONFIG_DIR}/config.json; the dual encoder's sizes are read from it"
            )
    with skeleton:
        model = build_method(cfg, int(info["num_classes"]), tokenizer)
    state = load_file(str(weights), device="cpu")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ExportError(f"{weights} does not fit method {cfg.method!r}: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{weights} does not fit method {cfg.method!r}: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}"
        )
    model.to(device).eval()
    return Exported(
        model=model, tokenizer=tokenizer, cfg=saved_cfg, metrics=metrics, info=info, path=root, clip_config=clip_config
    )
