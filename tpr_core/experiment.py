"""Experiment configs checked against the method table: the way every config is loaded.

``tpr_core.config`` is the schema alone; the checks that need a method's recipe
(``tpr_core.models.registry``) are here, above both:

- ``method`` names a registered method;
- ``loss.weights`` names only terms of that method, and the terms it leaves out take the
  recipe's default weights (so every weight is a searchable, logged leaf);
- model fields that only another encoder kind reads (``ENCODER_ONLY_FIELDS``) stay unset;
- ``data.sampler``, when the config leaves it unset, is the recipe's.

``load_config`` (a YAML file plus dotted overrides) and ``config_from_dict`` (a raw tree)
parse and check; every caller that turns data into an :class:`ExperimentConfig` goes
through one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tpr_core.config import ConfigError, ExperimentConfig, ModelConfig, parse_config, read_config_tree
from tpr_core.models import ENCODER_ONLY_FIELDS, known_methods, method_spec

__all__ = ["check_experiment", "config_from_dict", "load_config"]


def _in_use(model: ModelConfig, field: str) -> bool:
    """Whether ``model.<field>`` differs from its default (a stride equal to the patch is none)."""
    value = getattr(model, field)
    if field == "patch_stride" and value == model.patch_size:
        return False
    return value != type(model).model_fields[field].default


def _encoder_fields(cfg: ExperimentConfig, encoder: str) -> None:
    """Raise unless every model field that only another encoder kind reads is left unset."""
    for kind, fields in ENCODER_ONLY_FIELDS.items():
        used = [f for f in fields if _in_use(cfg.model, f)] if kind != encoder else []
        if used:
            owners = " or ".join(repr(m) for m in known_methods() if method_spec(m).encoder == kind)
            raise ConfigError(f"model.{used[0]} applies to method {owners} (the {kind} encoder) only")


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check ``cfg`` against its method's recipe and fill in the recipe's defaults.

    Returns ``cfg`` with ``loss.weights`` completed with the recipe's default weights and, when
    the config does not set ``data.sampler``, the recipe's sampler (the config validated again,
    as the sampler takes part in the batch checks).

    Raises:
        ConfigError: an unknown method, a weight for a term the method lacks, or a model
            field of another encoder kind.
    """
    spec = method_spec(cfg.method)  # names the known methods
    unknown = sorted(set(cfg.loss.weights) - set(spec.terms))
    if unknown:
        raise ConfigError(
            f"loss.weights.{unknown[0]} is not a loss term of method {cfg.method!r}; "
            f"its terms are {sorted(spec.terms)}"
        )
    if "sampler" not in cfg.data.model_fields_set and cfg.data.sampler != spec.sampler:
        tree = cfg.model_dump()
        tree["data"]["sampler"] = spec.sampler
        cfg = parse_config(tree, f"<{cfg.method} recipe sampler>")
    full = {**spec.terms, **cfg.loss.weights}
    if full != cfg.loss.weights:
        object.__setattr__(cfg.loss, "weights", full)  # no re-validation: the values were checked
    _encoder_fields(cfg, spec.encoder)
    return cfg


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a raw config tree and check it against its method; errors name ``source``."""
    cfg = parse_config(tree, source)
    try:
        return check_experiment(cfg)
    except ConfigError as err:
        raise ConfigError(f"invalid config {source}:\n  {err}") from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply dotted overrides, validate and check. Errors name the file and key."""
    return config_from_dict(read_config_tree(path, overrides), str(path))
