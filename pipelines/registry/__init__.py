"""Model registry: register a trained model, promote a champion only when it is better, roll back.

Modules
    :mod:`~pipelines.registry.common`      names shared by all: artifact paths, aliases, exit
                                           codes, :class:`RegistryError`.
    :mod:`~pipelines.registry.lock`        :class:`PromotionLock`, one promotion at a time.
    :mod:`~pipelines.registry.promotion`   the gate, :func:`promote`, :func:`rollback`, aliases.
    :mod:`~pipelines.registry.artifacts`   the source run, downloads, what a downloaded model
                                           holds, logging the pyfunc.
    :mod:`~pipelines.registry.evaluation`  :func:`evaluate_exported` on one split.
    :mod:`~pipelines.registry.gallery`     :func:`build_gallery_index` of the serving model.
    :mod:`~pipelines.registry.query`       :func:`search` of a registered model with a text.
    :mod:`~pipelines.registry.listing`     :func:`list_models`, :func:`list_versions` (``tpr models``).

The names below are the package's API: ``from pipelines import registry; registry.promote(...)``.
"""

from pipelines.registry.artifacts import (
    download_registered_model,
    download_run_model,
    exported_dir_of,
    gallery_index_of,
    load_retrieval_model,
    log_registered_model,
    resolve_source_run,
)
from pipelines.registry.common import (
    CHALLENGER,
    CHAMPION,
    EXIT_KEPT,
    EXIT_PROMOTED,
    GATE_METRIC,
    LOCK_SUFFIX,
    MODEL_ARTIFACT_PATH,
    PREVIOUS,
    SERVING_FILE,
    SERVING_MODEL_NAME,
    RegistryError,
)
from pipelines.registry.evaluation import EvalOutcome, evaluate_exported
from pipelines.registry.gallery import build_gallery_index
from pipelines.registry.listing import list_models, list_versions
from pipelines.registry.lock import PromotionLock, PromotionLockTimeout, break_lock
from pipelines.registry.promotion import (
    PromotionResult,
    RollbackResult,
    gate_decision,
    preview_promotion,
    promote,
    rollback,
)
from pipelines.registry.query import SearchResult, search

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXIT_KEPT",
    "EXIT_PROMOTED",
    "GATE_METRIC",
    "LOCK_SUFFIX",
    "MODEL_ARTIFACT_PATH",
    "PREVIOUS",
    "SERVING_FILE",
    "SERVING_MODEL_NAME",
    "EvalOutcome",
    "PromotionLock",
    "PromotionLockTimeout",
    "break_lock",
    "PromotionResult",
    "RegistryError",
    "RollbackResult",
    "SearchResult",
    "build_gallery_index",
    "download_registered_model",
    "load_retrieval_model",
    "download_run_model",
    "evaluate_exported",
    "exported_dir_of",
    "gallery_index_of",
    "gate_decision",
    "list_models",
    "list_versions",
    "log_registered_model",
    "preview_promotion",
    "promote",
    "resolve_source_run",
    "rollback",
    "search",
]
