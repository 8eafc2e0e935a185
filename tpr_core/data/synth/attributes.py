"""The attribute vocabulary of a synthetic person, the sampling of identities, and visibility.

An identity is a plain JSON-serialisable dict of attributes (see ``make_identities``);
``visible_attributes`` blanks what one image cannot show, for the caption writer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: Garment / shoe / bag palette: name -> RGB. Names are what captions say.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "gray": (128, 128, 128),
    "red": (200, 32, 36),
    "blue": (36, 72, 196),
    "green": (38, 140, 60),
    "yellow": (232, 200, 40),
    "brown": (118, 74, 40),
    "pink": (236, 112, 168),
    "purple": (118, 52, 150),
    "orange": (238, 128, 30),
}
#: Hair palette: name -> RGB (separate from garments: "blonde" hair, "yellow" shirt).
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (22, 18, 18),
    "brown": (96, 58, 30),
    "blonde": (212, 180, 108),
    "gray": (165, 165, 165),
}
GENDERS = ("man", "woman")
BUILDS = ("thin", "average", "heavy")
HAIR_LENGTHS = ("short", "long")
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater")
SLEEVES = ("short", "long")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAG_TYPES = ("none", "backpack", "handbag", "shoulder bag")
SIDES = ("left", "right")
#: Views: "left"/"right" are side views naming the body side that faces the camera.
VIEWS = ("front", "back", "left", "right")

UPPER_COLORS = tuple(COLORS)
LOWER_COLORS = ("black", "blue", "gray", "white", "brown", "green", "red", "pink")
SHOE_COLORS = ("black", "white", "brown", "gray", "red", "blue")
BAG_COLORS = ("black", "brown", "red", "blue", "gray", "pink", "white", "green")
HAT_COLORS = ("black", "white", "red", "blue", "gray")
LOGO_COLORS = ("white", "black", "red", "yellow", "blue")

#: Skin tones (RGB); an identity stores the index.
_SKINS = ((232, 192, 164), (198, 150, 112), (120, 84, 60))
_LOGO_SHAPES = ("square", "circle", "triangle")
#: The attributes a caption can name: no two identities share all of them.
SIGNATURE_KEYS = (
    "gender",
    "build",
    "hair_length",
    "hair_color",
    "upper_type",
    "sleeve",
    "upper_color",
    "logo",
    "lower_type",
    "lower_color",
    "shoe_color",
    "bag",
    "bag_color",
    "bag_side",
    "hat",
    "glasses",
)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one (seed, *keys) stream, independent of every other stream."""
    # SeedSequence wants non-negative entropy; folding keeps negative CLI seeds valid and distinct.
    return np.random.default_rng([seed % (1 << 63), *keys])


def _pick(rng: np.random.Generator, items: Sequence[Any], p: Sequence[float] | None = None) -> Any:
    """One of ``items``, drawn with probabilities ``p`` (uniform when None)."""
    return items[int(rng.choice(len(items), p=p))]


def _draw_outfit(rng: np.random.Generator) -> dict[str, Any]:
    upper_type = _pick(rng, UPPER_TYPES, (0.3, 0.2, 0.2, 0.12, 0.18))
    if upper_type == "t-shirt":
        sleeve = "short"
    elif upper_type == "shirt":
        sleeve = _pick(rng, SLEEVES)
    else:
        sleeve = "long"
    lower_type = _pick(rng, LOWER_TYPES, (0.6, 0.2, 0.2))
    return {
        "upper_type": upper_type,
        "sleeve": sleeve,
        "upper_color": _pick(rng, UPPER_COLORS),
        "lower_type": lower_type,
        "lower_color": _pick(rng, LOWER_COLORS),
    }


def _signature(a: dict[str, Any]) -> tuple:
    return tuple(a[k] for k in SIGNATURE_KEYS)


def make_identities(identities: int, seed: int) -> dict[int, dict[str, Any]]:
    """Draw the attributes of every identity.

    Outfits (upper type, sleeve, colours of top and bottom) come from a small set of shared
    clusters, about three identities per cluster, so several people wear the same top and bottom
    and differ only in shoes, bag, hair or accessories. No two identities share every captioned
    attribute.

    Args:
        identities: Number of identities N; ids are 1..N as in CUHK-PEDES.
        seed: Generator seed.

    Returns:
        ``{id: attributes}``; each attribute dict is JSON-serialisable with the keys gender,
        build, skin, hair_length, hair_color, upper_type, sleeve, upper_color, logo (colour or
        None), logo_shape, lower_type, lower_color, shoe_color, bag (one of ``BAG_TYPES``),
        bag_color, bag_side (None unless handbag / shoulder bag), hat (colour or None), glasses,
        outfit (cluster index).
    """
    crng = _rng(seed, 3)
    n_clusters = max(2, math.ceil(identities / 3))
    clusters = [_draw_outfit(crng) for _ in range(n_clusters)]
    seen: set[tuple] = set()
    out: dict[int, dict[str, Any]] = {}
    for pid in range(1, identities + 1):
        rng = _rng(seed, 0, pid)
        while True:  # resample on a full collision; the loop is deterministic per (seed, N)
            a = _draw_identity(rng, clusters)
            if _signature(a) not in seen:
                break
        seen.add(_signature(a))
        out[pid] = a
    return out


def _draw_identity(rng: np.random.Generator, clusters: list[dict[str, Any]]) -> dict[str, Any]:
    k = int(rng.integers(len(clusters)))
    a: dict[str, Any] = {"outfit": k, **clusters[k]}
    # A few members of a cluster change one colour, so clusters overlap instead of tiling.
    if rng.random() < 0.2:
        a["lower_color"] = _pick(rng, LOWER_COLORS)
    elif rng.random() < 0.1:
        a["upper_color"] = _pick(rng, UPPER_COLORS)
    gender = "woman" if a["lower_type"] == "skirt" else _pick(rng, GENDERS)
    a["gender"] = gender
    a["build"] = _pick(rng, BUILDS, (0.3, 0.45, 0.25))
    a["skin"] = int(rng.integers(len(_SKINS)))
    a["hair_length"] = _pick(rng, HAIR_LENGTHS, (0.85, 0.15) if gender == "man" else (0.25, 0.75))
    a["hair_color"] = _pick(rng, tuple(HAIR_COLORS), (0.5, 0.3, 0.12, 0.08))
    if rng.random() < 0.35:
        a["logo"] = _pick(rng, [c for c in LOGO_COLORS if c != a["upper_color"]])
    else:
        a["logo"] = None
    a["logo_shape"] = _pick(rng, _LOGO_SHAPES)
    a["shoe_color"] = _pick(rng, SHOE_COLORS)
    bag_p = (0.3, 0.32, 0.08, 0.3) if gender == "man" else (0.25, 0.25, 0.25, 0.25)
    a["bag"] = _pick(rng, BAG_TYPES, bag_p)
    a["bag_color"] = _pick(rng, BAG_COLORS) if a["bag"] != "none" else None
    a["bag_side"] = _pick(rng, SIDES) if a["bag"] in ("handbag", "shoulder bag") else None
    a["hat"] = _pick(rng, HAT_COLORS) if rng.random() < 0.15 else None
    a["glasses"] = bool(rng.random() < 0.2)
    return a


def visible_attributes(
    attributes: dict[str, Any], view: str | None = None, hidden: Iterable[str] = ()
) -> dict[str, Any]:
    """The attributes a viewer can see in one image.

    Args:
        attributes: One identity's attribute dict (see ``make_identities``).
        view: One of ``VIEWS``, or None for the whole identity (everything visible).
        hidden: Items covered by an occluder: any of "shoes", "bag", "logo", "hat", "glasses".

    Returns:
        A copy with the invisible items blanked (logo/hat/shoe_color/bag_color None, bag "none",
        glasses False) and ``bag_part``: "full", "straps" (a backpack seen from the front) or None.
    """
    v = dict(attributes)
    hidden = set(hidden)
    if view is not None and view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} or None, got {view!r}")
    v["view"] = view
    v["bag_part"] = "full" if v["bag"] != "none" else None
    if view is not None:
        if view != "front":
            v["logo"] = None
        if view == "back":
            v["glasses"] = False
        if v["bag"] == "backpack" and view == "front":
            v["bag_part"] = "straps"
        if v["bag"] == "handbag" and view in ("left", "right") and v["bag_side"] != view:
            hidden.add("bag")  # held on the far side, behind the body
    for item in hidden:
        if item == "shoes":
            v["shoe_color"] = None
        elif item == "bag":
            v["bag"], v["bag_color"], v["bag_side"], v["bag_part"] = "none", None, None, None
        elif item == "logo":
            v["logo"] = None
        elif item == "hat":
            v["hat"] = None
        elif item == "glasses":
            v["glasses"] = False
        else:
            raise ValueError(f"unknown hidden item {item!r}")
    return v
