"""Methods are recipes: a registry entry names the loss terms (with default weights) and
the batch views a method needs, and a builder that makes its module from the config.

Tune chooses between names, never between import paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from tpr_core.config import ExperimentConfig


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of.

    Attributes:
        name: registry name.
        terms: loss term name -> default weight (``loss.weights.<term>``).
        views: batch views the data side must build: ``mlm`` (masked caption + labels),
            ``text_aug`` (UIT caption pruning), ``levels`` (IVT phrase and word texts).
        sampler: default sampler (``random`` or ``identity``).
        encoder: ``dual`` (CLIP-style) or ``shared`` (IVT).
    """

    name: str
    terms: dict[str, float]
    views: tuple[str, ...] = ()
    sampler: str = "random"
    encoder: str = "dual"
    builder: Callable[..., Any] | None = field(default=None, compare=False, repr=False)


# The recipes. Default weights follow the papers: IRRA (Jiang & Ye, CVPR 2023) weighs
# sdm, id and mlm equally; FMFA keeps IRRA's terms with A-SDM in place of SDM and adds
# EFA; UIT adds a hardest-negative triplet and text-guided restoration; IVT aligns with CMPM
# at the sentence, phrase and word levels (one term, ``mla``).
_SPECS: dict[str, MethodSpec] = {
    "irra": MethodSpec("irra", {"sdm": 1.0, "id": 1.0, "mlm": 1.0}, ("mlm",)),
    "fmfa": MethodSpec("fmfa", {"a_sdm": 1.0, "efa": 1.0, "mlm": 1.0, "id": 1.0}, ("mlm",)),
    "uit": MethodSpec("uit", {"sdm": 1.0, "id": 1.0, "triplet": 1.0, "restore": 1.0}, ("text_aug",)),
    "ivt": MethodSpec(
        "ivt",
        {"mla": 1.0},
        ("levels", "level_images"),
        sampler="identity",
        encoder="shared",
    ),
}


def known_methods() -> list[str]:
    return sorted(_SPECS)


def method_spec(name: str) -> MethodSpec:
    """The spec of a registered method; an unknown name is an error listing the known ones."""
    from tpr_core.config import ConfigError

    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {known_methods()}") from None


def register_method(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach a builder ``fn(cfg, num_classes, vocab) -> nn.Module`` to a method spec."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = method_spec(name)
        _SPECS[name] = MethodSpec(spec.name, spec.terms, spec.views, spec.sampler, spec.encoder, fn)
        return fn

    return deco


def build_method(cfg: ExperimentConfig, num_classes: int, vocab: Any) -> nn.Module:
    """Build the module of ``cfg.method`` (see ``tpr_core.models`` for the interface)."""
    import tpr_core.models.methods  # noqa: F401  (registers the builders)

    spec = method_spec(cfg.method)
    if spec.builder is None:
        raise RuntimeError(f"method {cfg.method!r} has no builder registered")
    return spec.builder(cfg, num_classes, vocab)
