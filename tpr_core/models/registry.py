"""The method table: each method's recipe and module class, registered by name.

A method file declares its recipe on its class (``@register_method(MethodSpec(...))``); the
``tpr_core.models.methods`` package imports every method file, so importing anything under
``tpr_core.models`` fills the table. Tune chooses between names, never between import paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tpr_core.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from tpr_core.config import ExperimentConfig

Encoder = Literal["dual", "shared"]

# Model fields (``model.<field>``) that only one encoder kind reads; a recipe of another kind
# must leave them unset.
ENCODER_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "dual": (),
    "shared": ("pretrained_text", "patch_stride", "drop_path", "text_dropout"),
}


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of.

    Attributes:
        name: registry name (``method:`` in a config).
        encoder: ``dual`` (CLIP-style, ``model.pretrained`` a CLIP folder) or ``shared`` (one
            transformer for both modalities); decides which ``ENCODER_ONLY_FIELDS`` a config
            may set.
        terms: loss term name -> default weight (``loss.weights.<term>``).
        views: batch views the data side must build: ``mlm`` (masked caption + labels),
            ``text_aug`` (UIT caption pruning), ``levels`` (IVT phrase and word texts),
            ``level_images`` (IVT's image view per level).
        sampler: the training sampler the authors use (``data.sampler`` when a config leaves
            it unset): ``random``, ``identity`` or ``identity_random_k``.
    """

    name: str
    encoder: Encoder
    terms: dict[str, float]
    views: tuple[str, ...] = ()
    sampler: str = "random"


_METHODS: dict[str, tuple[MethodSpec, Any]] = {}

_Cls = TypeVar("_Cls")


def register_method(spec: MethodSpec) -> Callable[[_Cls], _Cls]:
    """Class decorator: add ``spec`` and its class to the table; a name registered twice is an error.

    The class gets the spec as ``cls.spec`` and must have a classmethod
    ``build(cfg, num_classes, tokenizer) -> nn.Module``.
    """

    def deco(cls: _Cls) -> _Cls:
        if spec.name in _METHODS:
            raise ValueError(f"method {spec.name!r} is already registered (by {_METHODS[spec.name][1].__qualname__})")
        if spec.encoder not in ENCODER_ONLY_FIELDS:
            raise ValueError(f"method {spec.name!r}: unknown encoder {spec.encoder!r}")
        if not callable(getattr(cls, "build", None)):
            raise TypeError(f"method {spec.name!r}: {cls!r} has no build(cfg, num_classes, tokenizer)")
        cls.spec = spec  # type: ignore[attr-defined]
        _METHODS[spec.name] = (spec, cls)
        return cls

    return deco


def known_methods() -> list[str]:
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The spec of a registered method; an unknown name is an error listing the known ones."""
    try:
        return _METHODS[name][0]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {known_methods()}") from None


def build_method(cfg: ExperimentConfig, num_classes: int, vocab: Any) -> nn.Module:
    """Build the module of ``cfg.method`` (see ``tpr_core.models`` for the interface)."""
    method_spec(cfg.method)  # an unknown name is a ConfigError
    return _METHODS[cfg.method][1].build(cfg, num_classes, vocab)
