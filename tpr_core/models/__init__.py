"""Models: encoders, heads, and the method recipes.

A method module (``build_method(cfg, num_classes, tokenizer)``) is an ``nn.Module`` with:

- ``encoder``: the backbone (base learning rate); every other submodule is a head
  (``optim.head_lr_factor``).
- ``forward(batch) -> dict[str, Tensor]``: always a dict; contains at least
  ``image_feats`` (B, D) and ``text_feats`` (B, D) (projected, not normalised).
- ``loss_terms(outputs, batch) -> dict[str, Tensor]``: one scalar per term of the
  method's spec (``tpr_core.models.registry``), unweighted.
- ``encode_image(images) -> (B, D)`` and ``encode_text(text_ids, text_mask) -> (B, D)``
  for evaluation (eval mode, not normalised).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tpr_core.models.registry import MethodSpec, build_method, known_methods, method_spec, register_method

# Encoders and heads import torch and transformers; they load on first access so that
# ``tpr_core.config`` (which consults the registry) stays cheap to import.
_LAZY = {
    "DualEncoder": "tpr_core.models.dual_encoder",
    "build_dual_encoder": "tpr_core.models.dual_encoder",
    "check_clip_dir": "tpr_core.models.dual_encoder",
    "interpolate_pos_embed": "tpr_core.models.dual_encoder",
    "load_clip_dir": "tpr_core.models.dual_encoder",
    "SharedEncoder": "tpr_core.models.shared_encoder",
    "build_shared_encoder": "tpr_core.models.shared_encoder",
    "IRRHead": "tpr_core.models.heads",
    "RestorationHead": "tpr_core.models.heads",
    "identity_classifier": "tpr_core.models.heads",
    "DUAL_PRESETS": "tpr_core.models.presets",
    "SHARED_PRESETS": "tpr_core.models.presets",
}

__all__ = ["MethodSpec", "build_method", "known_methods", "method_spec", "register_method", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
