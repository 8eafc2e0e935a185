"""Models: encoders, heads, and the methods (one file each under ``tpr_core.models.methods``).

A method module (``build_method(cfg, num_classes, tokenizer)``) is an ``nn.Module`` with:

- ``encoder``: the backbone (base learning rate); every other submodule is a head
  (``optim.head_lr_factor``).
- ``forward(batch) -> dict[str, Tensor]``: always a dict; contains at least
  ``image_feats`` (B, D) and ``text_feats`` (B, D) (projected, not normalised).
- ``loss_terms(outputs, batch) -> dict[str, Tensor]``: one scalar per term of the
  method's spec (``method_spec(name).terms``), unweighted.
- ``encode_image(images) -> (B, D)`` and ``encode_text(text_ids, text_mask) -> (B, D)``
  for evaluation (eval mode, not normalised).

Importing this package imports every method file, so the method table
(``tpr_core.models.registry``) is full whenever any part of ``tpr_core.models`` is loaded.
"""

from tpr_core.models import methods  # noqa: F401  (registers every method)
from tpr_core.models.dual_encoder import (
    DualEncoder,
    build_dual_encoder,
    check_clip_dir,
    interpolate_pos_embed,
    load_clip_dir,
)
from tpr_core.models.heads import IRRHead, RestorationHead, identity_classifier
from tpr_core.models.presets import DUAL_PRESETS, SHARED_PRESETS
from tpr_core.models.registry import (
    ENCODER_ONLY_FIELDS,
    MethodSpec,
    build_method,
    known_methods,
    method_spec,
    register_method,
)
from tpr_core.models.shared_encoder import SharedEncoder, build_shared_encoder

__all__ = [
    "DUAL_PRESETS",
    "ENCODER_ONLY_FIELDS",
    "SHARED_PRESETS",
    "DualEncoder",
    "IRRHead",
    "MethodSpec",
    "RestorationHead",
    "SharedEncoder",
    "build_dual_encoder",
    "build_method",
    "build_shared_encoder",
    "check_clip_dir",
    "identity_classifier",
    "interpolate_pos_embed",
    "known_methods",
    "load_clip_dir",
    "method_spec",
    "register_method",
]
