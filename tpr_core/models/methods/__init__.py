"""The retrieval methods, one file each; importing this package registers them all.

Each file holds a method's module class and, in its ``@register_method(MethodSpec(...))``
decorator, its whole recipe: name, encoder kind, loss terms with default weights, batch
views. A new method is one more file here and one more import line below.

Each module follows the interface of ``tpr_core.models``: ``encoder`` (the backbone) plus
heads, ``forward(batch) -> dict``, ``loss_terms(outputs, batch, scope) -> dict`` with exactly
the terms of its spec (unweighted), ``encode_image`` and ``encode_text``.

``scope`` (:mod:`tpr_core.distributed`) is what the batch-level terms see: each method passes
through it every tensor that a term compares across samples (global features, pids, EFA's
tokens), so that N workers compute the terms of one process on the global batch; per-sample
terms (ID, MLM, restoration) use the local rows, with ``scope.mean`` for token- or patch-level
means.
"""

from tpr_core.models.methods.fmfa import FMFA
from tpr_core.models.methods.irra import IRRA
from tpr_core.models.methods.ivt import IVT
from tpr_core.models.methods.uit import UIT

__all__ = ["FMFA", "IRRA", "IVT", "UIT"]
