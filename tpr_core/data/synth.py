"""Synthetic pedestrians in the exact CUHK-PEDES layout (``tpr data synth``).

The project's stand-in for the real datasets, which cannot be downloaded here. Every identity
has a set of attributes (gender, hair, garments and their colours, shoes, bag, hat, glasses,
build); every image renders that person with PIL from a random viewpoint, pose, scale, background,
lighting, occlusion and noise; every caption is written from the attributes *visible in that
image*, in the style of CUHK-PEDES.

Identities are drawn from shared outfit clusters (same top and bottom, different shoes, bag, hair),
so retrieval needs the fine details and not only the two dominant colours.

Output folder ``OUT``::

    reid_raw.json      list of {split, captions, file_path, id, processed_tokens}  (CUHK-PEDES)
    imgs/synth/0001/0001_00.jpg ...
    attributes.json    sidecar, not CUHK-PEDES: {"<id>": attribute dict}
    views.json         sidecar: {"<file_path>": {view, occlusion, hidden, torso_box}}
    synth.json         the generation parameters (reuse check); written last

Determinism: one ``numpy.random.Generator`` per (seed, identity) for attributes and per
(seed, identity, image) for the image and its captions, so no result depends on iteration order
or on the number of worker processes; no timestamps are written; JPEG quality is fixed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tpr_core.config import ConfigError

__all__ = [
    "BAG_COLORS",
    "BAG_TYPES",
    "BUILDS",
    "COLORS",
    "GENDERS",
    "HAIR_COLORS",
    "HAIR_LENGTHS",
    "HAT_COLORS",
    "LOGO_COLORS",
    "LOWER_COLORS",
    "LOWER_TYPES",
    "SHOE_COLORS",
    "SIDES",
    "SLEEVES",
    "SPLITS",
    "UPPER_COLORS",
    "UPPER_TYPES",
    "VIEWS",
    "SynthError",
    "describe",
    "ensure_synthetic",
    "generate",
    "make_identities",
    "render_image",
    "visible_attributes",
]

GENERATOR_VERSION = 1  # bump when the output for a given seed changes; stale folders then error

# ----------------------------------------------------------------------------- vocabulary

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
SPLITS = ("train", "val", "test")

UPPER_COLORS = tuple(COLORS)
LOWER_COLORS = ("black", "blue", "gray", "white", "brown", "green", "red", "pink")
SHOE_COLORS = ("black", "white", "brown", "gray", "red", "blue")
BAG_COLORS = ("black", "brown", "red", "blue", "gray", "pink", "white", "green")
HAT_COLORS = ("black", "white", "red", "blue", "gray")
LOGO_COLORS = ("white", "black", "red", "yellow", "blue")

_SKINS = ((232, 192, 164), (198, 150, 112), (120, 84, 60))
_LOGO_SHAPES = ("square", "circle", "triangle")
_BUILD_WIDTH = {"thin": 0.86, "average": 1.0, "heavy": 1.24}
_VIEW_P = (0.35, 0.35, 0.15, 0.15)
_JPEG_QUALITY = 92


class SynthError(ConfigError):
    """The output folder holds something other than this synthetic dataset (names the file)."""


# ----------------------------------------------------------------------------- identities


def _rng(seed: int, *keys: int) -> np.random.Generator:
    # SeedSequence wants non-negative entropy; folding keeps negative CLI seeds valid and distinct.
    return np.random.default_rng([seed % (1 << 63), *keys])


def _pick(rng: np.random.Generator, items: Sequence[Any], p: Sequence[float] | None = None) -> Any:
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
    keys = (
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
    return tuple(a[k] for k in keys)


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


# ----------------------------------------------------------------------------- visibility


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


# ----------------------------------------------------------------------------- captions

_NOUNS = {
    "man": ("man", "man", "man", "guy", "gentleman"),
    "woman": ("woman", "woman", "woman", "lady", "girl"),
}
_BUILD_ADJ = {"thin": ("thin", "slim", "skinny"), "heavy": ("heavy", "heavyset", "chubby", "stocky")}
_UPPER_WORDS = {
    "t-shirt": ("t-shirt", "t-shirt", "tee", "tee shirt"),
    "shirt": ("shirt", "shirt", "button-up shirt"),
    "jacket": ("jacket", "jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "sweater": ("sweater", "jumper", "pullover"),
}
_SHOE_WORDS = ("shoes", "shoes", "sneakers", "trainers")
_BAG_WORDS = {
    "backpack": ("backpack", "backpack", "rucksack"),
    "handbag": ("handbag", "handbag", "purse"),
    "shoulder bag": ("shoulder bag", "shoulder bag", "messenger bag"),
}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    sep = ", and " if len(items) > 2 and rng.random() < 0.3 else " and "
    return ", ".join(items[:-1]) + sep + items[-1]


def _upper_np(v: dict[str, Any], rng: np.random.Generator) -> str:
    word = _pick(rng, _UPPER_WORDS[v["upper_type"]])
    if v["gender"] == "woman" and v["upper_type"] == "shirt" and rng.random() < 0.3:
        word = "blouse"
    color = v["upper_color"]
    post: list[str] = []
    inherent_long = v["upper_type"] in ("jacket", "coat", "sweater")
    r = rng.random()
    if r < 0.45 and not (inherent_long and r > 0.15):
        head = f"{color} {v['sleeve']}{_pick(rng, ('-sleeved', ' sleeve', '-sleeve'))} {word}"
    elif r < 0.7 and not inherent_long:
        head = f"{color} {word}"
        post.append(f"{v['sleeve']} sleeves")
    else:
        head = f"{color} {word}"
    if v["logo"] and rng.random() < 0.8:
        post.append(
            _pick(
                rng,
                (
                    f"{_a(v['logo'])} logo on the front",
                    f"{_a(v['logo'])} print on the chest",
                    f"{_a(v['logo'])} pattern on the front",
                ),
            )
        )
    np_ = _a(head)
    if post:
        np_ += " with " + " and ".join(post)
    return np_


def _lower_np(v: dict[str, Any], rng: np.random.Generator) -> str:
    t, c = v["lower_type"], v["lower_color"]
    if t == "skirt":
        return _a(f"{c} {_pick(rng, ('skirt', 'skirt', 'short skirt'))}")
    if t == "shorts":
        word = "shorts"
    else:
        words = ("trousers", "pants", "jeans") if c in ("blue", "black", "gray") else ("trousers", "pants")
        word = _pick(rng, words)
    return f"a pair of {c} {word}" if rng.random() < 0.2 else f"{c} {word}"


def _shoes_np(v: dict[str, Any], rng: np.random.Generator) -> str:
    word = _pick(rng, _SHOE_WORDS)
    return f"a pair of {v['shoe_color']} {word}" if rng.random() < 0.2 else f"{v['shoe_color']} {word}"


def _hair_np(v: dict[str, Any], rng: np.random.Generator) -> str:
    return f"{v['hair_length']} {v['hair_color']} hair"


def _bag_forms(v: dict[str, Any], his: str, rng: np.random.Generator) -> tuple[str, str]:
    """(finite verb phrase, participle phrase) about the visible bag."""
    c, kind = v["bag_color"], v["bag"]
    word = _pick(rng, _BAG_WORDS[kind])
    if v["bag_part"] == "straps":
        return _pick(
            rng,
            (
                (
                    f"has the straps of {_a(c + ' ' + word)} over {his} shoulders",
                    f"with the straps of {_a(c + ' ' + word)} over {his} shoulders",
                ),
                (f"carries {_a(c + ' ' + word)}", f"carrying {_a(c + ' ' + word)}"),
                (
                    f"wears {_a(c + ' ' + word)} whose straps show on {his} shoulders",
                    f"with {c} {word} straps on {his} shoulders",
                ),
            ),
        )
    side = v["bag_side"]
    if kind == "backpack":
        return _pick(
            rng,
            (
                (
                    f"carries {_a(c + ' ' + word)} on {his} back",
                    f"carrying {_a(c + ' ' + word)} on {his} back",
                ),
                (f"has {_a(c + ' ' + word)}", f"with {_a(c + ' ' + word)}"),
                (f"is carrying {_a(c + ' ' + word)}", f"carrying {_a(c + ' ' + word)}"),
            ),
        )
    if kind == "handbag":
        where = f" in {his} {side} hand" if rng.random() < 0.5 else ""
        return _pick(
            rng,
            (
                (f"holds {_a(c + ' ' + word)}{where}", f"holding {_a(c + ' ' + word)}{where}"),
                (f"carries {_a(c + ' ' + word)}{where}", f"carrying {_a(c + ' ' + word)}{where}"),
            ),
        )
    where = f" on {his} {side} side" if rng.random() < 0.5 else ""
    return _pick(
        rng,
        (
            (f"has {_a(c + ' ' + word)}{where}", f"with {_a(c + ' ' + word)}{where}"),
            (f"carries {_a(c + ' ' + word)}{where}", f"carrying {_a(c + ' ' + word)}{where}"),
            (
                f"is carrying {_a(c + ' ' + word)} over {his} shoulder",
                f"carrying {_a(c + ' ' + word)} over {his} shoulder",
            ),
        ),
    )


def describe(
    attributes: dict[str, Any], rng: np.random.Generator, view: str | None = None, hidden: Iterable[str] = ()
) -> str:
    """Write one CUHK-PEDES style caption of the attributes visible from ``view``.

    Templates, synonyms and the order of phrases vary with ``rng``; hair, lower garment, shoes,
    logo, sleeves and accessories are sometimes left out, the upper garment and a visible bag
    never are. Phrases are comma separated (IVT splits captions on commas).

    Args:
        attributes: One identity's attribute dict (see ``make_identities``).
        rng: Source of the wording choices.
        view: One of ``VIEWS``; None describes the whole identity.
        hidden: Items covered by an occluder in this image (see ``visible_attributes``).

    Returns:
        One caption, e.g. "A woman with long black hair is wearing a red short-sleeved shirt,
        blue jeans and white shoes. She carries a black backpack on her back."
    """
    v = visible_attributes(attributes, view, hidden)
    man = v["gender"] == "man"
    he, his = ("he", "his") if man else ("she", "her")
    noun = _pick(rng, _NOUNS[v["gender"]])
    adj = ""
    if v["build"] in _BUILD_ADJ and rng.random() < 0.4:
        adj = _pick(rng, _BUILD_ADJ[v["build"]]) + " "
    det = _pick(rng, ("A", "A", "A", "The", "This"))
    subject = f"{det} {adj}{noun}"

    # Items as (finite verb phrase, participle phrase); clothes go in one list.
    clothes = [_upper_np(v, rng)]
    if rng.random() > 0.1:
        clothes.append(_lower_np(v, rng))
    shoes_sep = None
    if v["shoe_color"] and rng.random() > 0.2:
        if rng.random() < 0.25:
            shoes_sep = _shoes_np(v, rng)
        else:
            clothes.append(_shoes_np(v, rng))
    if len(clothes) > 2 and rng.random() < 0.2:
        rest = clothes[1:]
        rng.shuffle(rest)
        clothes[1:] = rest
    wear = _pick(rng, (("is wearing", "wearing"), ("wears", "in"), ("is dressed in", "dressed in")))
    worn = _join(clothes, rng)
    items: list[tuple[str, str]] = [(f"{wear[0]} {worn}", f"{wear[1]} {worn}")]
    extras: list[tuple[str, str]] = []
    modifier = ""
    if rng.random() > 0.15:
        hair = _hair_np(v, rng)
        if rng.random() < 0.4:  # into the subject: "A woman with long black hair is wearing ..."
            modifier = f" with {hair}"
        else:
            extras.append((f"has {hair}", f"with {hair}"))
    if shoes_sep:
        extras.append(
            _pick(
                rng,
                (
                    (f"wears {shoes_sep}", f"with {shoes_sep}"),
                    (f"has {shoes_sep} on", f"wearing {shoes_sep}"),
                ),
            )
        )
    if v["bag"] != "none":
        extras.append(_bag_forms(v, his, rng))
    if v["hat"] and rng.random() > 0.1:
        hat = _a(f"{v['hat']} {_pick(rng, ('hat', 'cap'))}")
        extras.append(
            _pick(rng, ((f"wears {hat}", f"wearing {hat}"), (f"has {hat} on {his} head", f"with {hat}")))
        )
    if v["glasses"] and rng.random() > 0.2:
        extras.append(_pick(rng, (("wears glasses", "wearing glasses"), ("has glasses on", "with glasses"))))
    extras = [extras[i] for i in rng.permutation(len(extras))]
    # The clothing list usually comes first, as in most CUHK-PEDES captions.
    pos = 0 if rng.random() < 0.7 else int(rng.integers(len(extras) + 1))
    items = extras[:pos] + items + extras[pos:]
    subject += modifier

    style = rng.random()
    if style < 0.3:  # one sentence, participles: "A woman wearing X, Y and Z, with ..., carrying ..."
        text = f"{subject} " + ", ".join(it[1] for it in items) + "."
    elif style < 0.55 or len(items) == 1:  # one sentence, finite clauses joined with commas
        fin = [it[0] for it in items]
        body = fin[0] if len(fin) == 1 else ", ".join(fin[:-1]) + ", and " + fin[-1]
        text = f"{subject} {body}."
    elif style < 0.9:  # two sentences: the first item(s), then the rest after a pronoun
        k = 1 if rng.random() < 0.7 else min(2, len(items) - 1)
        first = _join([it[0] for it in items[:k]], rng)
        second = [it[0] for it in items[k:]]
        rest = second[0] if len(second) == 1 else ", ".join(second[:-1]) + ", and " + second[-1]
        text = f"{subject} {first}. {he.capitalize()} {rest}."
    else:  # a sentence per item
        parts = [f"{subject} {items[0][0]}."] + [f"{he.capitalize()} {it[0]}." for it in items[1:]]
        text = " ".join(parts)
    return text[0].upper() + text[1:]


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


# ----------------------------------------------------------------------------- rendering


def _shade(rgb: Sequence[float], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * f)))) for c in rgb)  # type: ignore[return-value]


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, amp: float) -> np.ndarray:
    """Smooth random texture around ``base`` colour: low-res noise upsampled bilinearly."""
    gh, gw = max(2, h // 12), max(2, w // 12)
    # Mostly luminance, a little chroma: backgrounds must not look like garment colours.
    low = rng.standard_normal((gh, gw, 3), dtype=np.float32) * (amp * 0.3)
    low += rng.standard_normal((gh, gw, 1), dtype=np.float32) * amp
    low8 = Image.fromarray(np.clip(low + 128.0, 0, 255).astype(np.uint8))
    up = np.asarray(low8.resize((w, h), Image.BILINEAR), dtype=np.float32) - 128.0
    return base[None, None, :] + up  # (h, w, 3)


def _muted(rng: np.random.Generator, lo: float, hi: float, tint: float) -> np.ndarray:
    g = rng.uniform(lo, hi)
    return np.clip(g + rng.normal(0.0, tint, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Street-like backdrop: wall with blocks (windows, doors, poles), floor, gradient, texture."""
    wall, floor = _muted(rng, 70, 200, 16), _muted(rng, 60, 170, 10)
    horizon = int(h * rng.uniform(0.55, 0.8))
    arr = np.empty((h, w, 3), np.float32)
    arr[:horizon] = wall
    arr[horizon:] = floor
    for _ in range(int(rng.integers(2, 7))):  # blocks on the wall
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.9) * horizon
        bw, bh = rng.uniform(0.08, 0.6) * w, rng.uniform(0.05, 0.5) * h
        xs, ys = (
            slice(max(0, int(x0)), max(0, int(x0 + bw))),
            slice(max(0, int(y0)), min(horizon, int(y0 + bh))),
        )
        arr[ys, xs] = arr[ys, xs] * rng.uniform(0.7, 1.25) + rng.normal(0, 8, 3)
    if rng.random() < 0.5:  # floor tiles / curb lines
        step = max(2, int(h * rng.uniform(0.03, 0.08)))
        arr[horizon::step] *= 0.85
    arr *= np.linspace(rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.1), h, dtype=np.float32)[:, None, None]
    arr += _texture(rng, h, w, np.zeros(3, np.float32), rng.uniform(3, 12))
    return arr


class _Canvas:
    """Drawing in person coordinates: y as a fraction of person height, x of the width unit."""

    def __init__(self, img: Image.Image, cx: float, top: float, hp: float, u: float) -> None:
        self.d = ImageDraw.Draw(img)
        self.cx, self.top, self.hp, self.u = cx, top, hp, u

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.u, self.top + y * self.hp)

    def poly(self, pts: Sequence[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def ellipse(
        self, x: float, y: float, rx: float, ry: float, fill: tuple[int, int, int]
    ) -> tuple[float, ...]:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        box = (x0, y0, max(x0, x1), max(y0, y1))
        self.d.ellipse(box, fill=fill)
        return box

    def chord_top(
        self, x: float, y: float, rx: float, ry: float, fill: tuple[int, int, int]
    ) -> tuple[float, ...]:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        box = (x0, y0, max(x0, x1), max(y0, y1))
        self.d.chord(box, 180, 360, fill=fill)
        return (box[0], box[1], box[2], (box[1] + box[3]) / 2)

    def limb(
        self, a: tuple[float, float], b: tuple[float, float], w: float, fill: tuple[int, int, int]
    ) -> None:
        pa, pb = self.p(*a), self.p(*b)
        wp = max(1.0, w * self.u)
        self.d.line([pa, pb], fill=fill, width=max(1, round(wp)))
        r = wp / 2
        for q in (pa, pb):  # round joints
            self.d.ellipse((q[0] - r, q[1] - r, q[0] + r, q[1] + r), fill=fill)

    def rect(
        self, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int]
    ) -> tuple[float, ...]:
        (a, b), (c, d) = self.p(x0, y0), self.p(x1, y1)
        box = (min(a, c), min(b, d), max(a, c), max(b, d))
        self.d.rectangle(box, fill=fill)
        return box


def _limb_end(
    start: tuple[float, float], length: float, angle: float, hp_over_u: float
) -> tuple[float, float]:
    """End of a limb of ``length`` (person heights) at ``angle`` radians from straight down."""
    return (start[0] + math.sin(angle) * length * hp_over_u, start[1] + math.cos(angle) * length)


def render_image(
    attributes: dict[str, Any], rng: np.random.Generator, size: tuple[int, int] = (384, 128)
) -> tuple[Image.Image, dict[str, Any]]:
    """Render one image of a person.

    Args:
        attributes: One identity's attribute dict (see ``make_identities``).
        rng: Source of every per-image choice (view, pose, placement, background, light, noise).
        size: (height, width) in pixels.

    Returns:
        The RGB image and its info: ``view`` (one of ``VIEWS``), ``occlusion`` (None, "bottom" or
        "side"), ``hidden`` (items mostly covered by the occluder) and ``torso_box``: a pixel box
        (x0, y0, x1, y1) on the lower torso, clear of logo, hair and backpack in front and back
        views, where the upper garment colour shows.
    """
    a = attributes
    h, w = size
    view = VIEWS[int(rng.choice(len(VIEWS), p=_VIEW_P))]
    hp = h * rng.uniform(0.8, 0.93)
    top = (h - hp) * rng.uniform(0.15, 0.85)
    cx = w / 2 + w * rng.uniform(-0.07, 0.07)
    u = min(hp, 3.0 * w)  # horizontal unit: keeps the person inside narrow images
    k = hp / u  # converts lengths in person heights to horizontal units
    b = _BUILD_WIDTH[a["build"]] * (0.93 if a["gender"] == "woman" else 1.0)

    img = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
    cv = _Canvas(img, cx, top, hp, u)
    skin = _SKINS[a["skin"]]
    hair_c = HAIR_COLORS[a["hair_color"]]
    up_c, low_c = COLORS[a["upper_color"]], COLORS[a["lower_color"]]
    shoe_c = COLORS[a["shoe_color"]]
    bag_c = COLORS[a["bag_color"]] if a["bag_color"] else None
    boxes: dict[str, tuple[float, ...]] = {}

    side_view = view in ("left", "right")
    # Image-x sign of the body's left side: facing the camera the person's left is image right.
    left_sign = {"front": 1.0, "back": -1.0}.get(view, 0.0)
    facing = 1.0 if view == "left" else -1.0  # side views: direction the person walks in
    sw, ww = 0.122 * b, 0.092 * b  # shoulder and waist half-widths (front / back)
    hem = {"coat": 0.66, "jacket": 0.52}.get(a["upper_type"], 0.5)
    arm_w, thigh_w, shin_w = 0.045 * b, 0.062 * b, 0.046 * b
    upper_len, fore_len, thigh_len, shin_len = 0.16, 0.15, 0.22, 0.22
    hip_y, sh_y = 0.49, 0.175

    def leg_colors() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        t = a["lower_type"]
        return (low_c, low_c) if t == "trousers" else ((low_c, skin) if t == "shorts" else (skin, skin))

    thigh_c, shin_c = leg_colors()

    def draw_leg(hip: tuple[float, float], ang: float, knee_bend: float, dim: float) -> tuple[float, float]:
        knee = _limb_end(hip, thigh_len, ang, k)
        ankle = _limb_end(knee, shin_len, ang - knee_bend, k)
        cv.limb(knee, ankle, shin_w, _shade(shin_c, dim))
        cv.limb(hip, knee, thigh_w, _shade(thigh_c, dim))
        if a["lower_type"] == "shorts":  # hem of the shorts above the knee
            mid = ((hip[0] + knee[0] * 2) / 3, (hip[1] + knee[1] * 2) / 3)
            cv.limb(hip, mid, thigh_w * 1.12, _shade(low_c, dim))
        return ankle

    def draw_shoe(ankle: tuple[float, float], direction: float, dim: float) -> None:
        if direction == 0.0:
            box = cv.ellipse(ankle[0], ankle[1] + 0.018, 0.033 * b, 0.022, _shade(shoe_c, dim))
        else:
            box = cv.ellipse(ankle[0] + direction * 0.025, ankle[1] + 0.018, 0.05, 0.02, _shade(shoe_c, dim))
        boxes["shoes"] = _union(boxes.get("shoes"), box)

    def draw_arm(shoulder: tuple[float, float], ang: float, bend: float, dim: float) -> tuple[float, float]:
        elbow = _limb_end(shoulder, upper_len, ang, k)
        wrist = _limb_end(elbow, fore_len, ang + bend, k)
        sleeve_c = _shade(up_c, dim)
        if a["sleeve"] == "long":
            cv.limb(elbow, wrist, arm_w * 0.9, sleeve_c)
            cv.limb(shoulder, elbow, arm_w, sleeve_c)
        else:
            cv.limb(elbow, wrist, arm_w * 0.8, _shade(skin, dim))
            cv.limb(shoulder, elbow, arm_w * 0.85, _shade(skin, dim))
            mid = ((shoulder[0] * 2 + elbow[0]) / 3, (shoulder[1] * 2 + elbow[1]) / 3)
            cv.limb(shoulder, mid, arm_w * 1.05, sleeve_c)
        hand = _limb_end(wrist, 0.02, ang + bend, k)
        cv.ellipse(hand[0], hand[1], 0.022 * b, 0.018, _shade(skin, dim))
        return hand

    def draw_handbag(hand: tuple[float, float]) -> None:
        x, y = hand
        cv.limb((x - 0.012, y), (x + 0.012, y + 0.02), 0.008, _shade(bag_c, 0.7))
        boxes["bag"] = cv.rect(x - 0.045, y + 0.015, x + 0.045, y + 0.085, bag_c)

    if not side_view:
        # --- front / back ------------------------------------------------------------------
        abd = rng.uniform(0.03, 0.22, 2)  # arm abduction per side
        bend = rng.uniform(-0.05, 0.2, 2)
        spread = rng.uniform(0.0, 0.1, 2)
        hold_side = None
        if a["bag"] == "handbag":
            hold_side = left_sign if a["bag_side"] == "left" else -left_sign
        if a["hair_length"] == "long" and view == "front":  # hair behind the shoulders
            cv.poly([(-0.06, 0.06), (0.06, 0.06), (0.07, 0.27), (-0.07, 0.27)], hair_c)
        ankles = []
        for i, s in enumerate((-1.0, 1.0)):
            ankles.append(draw_leg((s * 0.048 * b, hip_y), s * spread[i], -s * spread[i] * 0.5, 1.0))
        for ank in ankles:
            draw_shoe(ank, 0.0, 1.0)
        if a["lower_type"] in ("trousers", "shorts"):
            cv.poly(
                [
                    (-ww, hip_y - 0.03),
                    (ww, hip_y - 0.03),
                    (ww * 0.95, hip_y + 0.05),
                    (0, hip_y + 0.06),
                    (-ww * 0.95, hip_y + 0.05),
                ],
                low_c,
            )
        elif a["lower_type"] == "skirt":
            flare = rng.uniform(0.05, 0.075)
            cv.poly([(-ww, 0.46), (ww, 0.46), (ww + flare * b, 0.68), (-ww - flare * b, 0.68)], low_c)
        boxes["lower"] = (cv.p(-ww, hip_y)[0], cv.p(0, hip_y)[1], cv.p(ww, 0)[0], cv.p(0, 0.9)[1])
        # torso
        bottom_half = ww + (0.025 * b if a["upper_type"] == "coat" else 0.0)
        torso = [
            (-0.035, 0.145),
            (0.035, 0.145),
            (sw, sh_y - 0.01),
            (sw - 0.005, 0.24),
            (ww, 0.44),
            (bottom_half, hem),
            (-bottom_half, hem),
            (-ww, 0.44),
            (-(sw - 0.005), 0.24),
            (-sw, sh_y - 0.01),
        ]
        cv.poly(torso, up_c)
        _garment_details(cv, a, view, up_c, skin, sw, ww, hem)
        hands = {}
        for i, s in enumerate((-1.0, 1.0)):
            ang = s * (0.03 if hold_side == s else abd[i])
            hands[s] = draw_arm(
                (s * (sw - 0.02), sh_y + 0.005), ang, s * (0.0 if hold_side == s else bend[i]), 1.0
            )
        # neck and head
        cv.rect(-0.018, 0.11, 0.018, 0.155, skin)
        head_y, rx, ry = 0.068, 0.046, 0.062
        if view == "front":
            cv.ellipse(0, head_y, rx, ry, skin)
            cv.chord_top(0, head_y - 0.004, rx * 1.06, ry * 1.02, hair_c)
            cv.ellipse(0, head_y + 0.004, rx * 0.86, ry * 0.76, skin)  # face under the fringe
            if a["hair_length"] == "long":
                for s in (-1.0, 1.0):
                    cv.poly(
                        [
                            (s * rx * 0.8, head_y - 0.01),
                            (s * rx * 1.08, head_y),
                            (s * rx * 1.2, 0.24),
                            (s * rx * 0.7, 0.24),
                        ],
                        hair_c,
                    )
            for s in (-1.0, 1.0):  # eyes
                cv.ellipse(s * 0.016, head_y + 0.0, 0.0045, 0.003, (40, 30, 30))
            if a["glasses"]:
                g = (20, 20, 24)
                boxes["glasses"] = _union(
                    cv.rect(-0.03, head_y - 0.006, -0.004, head_y + 0.006, g),
                    cv.rect(0.004, head_y - 0.006, 0.03, head_y + 0.006, g),
                )
                cv.limb((-0.04, head_y - 0.002), (0.04, head_y - 0.002), 0.004, g)
        else:
            cv.ellipse(0, head_y, rx, ry, hair_c)
            if a["hair_length"] == "short":
                cv.rect(-0.02, 0.115, 0.02, 0.15, skin)  # nape
        if a["logo"] and view == "front":
            boxes["logo"] = _logo(cv, a["logo_shape"], COLORS[a["logo"]], 0.0, 0.27, 0.03)
        if a["bag"] == "backpack":
            if view == "back":
                boxes["bag"] = cv.rect(-0.085 * b, 0.19, 0.085 * b, 0.38, bag_c)
                cv.rect(-0.06 * b, 0.3, 0.06 * b, 0.37, _shade(bag_c, 0.78))  # pocket
            else:
                for s in (-1.0, 1.0):
                    cv.limb((s * 0.075 * b, 0.16), (s * 0.07 * b, 0.37), 0.022, bag_c)
                boxes["bag"] = cv.p(-0.08 * b, 0.16) + cv.p(0.08 * b, 0.37)
        if a["hair_length"] == "long" and view == "back":  # hair falls over the back and a backpack
            cv.poly([(-0.05, 0.08), (0.05, 0.08), (0.062, 0.3), (0, 0.315), (-0.062, 0.3)], hair_c)
        if a["bag"] == "shoulder bag":
            s = left_sign if a["bag_side"] == "left" else -left_sign
            cv.limb((-s * sw * 0.7, 0.17), (s * (ww + 0.02), 0.45), 0.012, _shade(bag_c, 0.85))
            boxes["bag"] = cv.rect(s * (ww - 0.01), 0.44, s * (ww + 0.07), 0.52, bag_c)
        if a["bag"] == "handbag" and hold_side is not None:
            draw_handbag(hands[hold_side])
        head_top = head_y
    else:
        # --- side view: person walks toward ``facing`` ----------------------------------------
        d = facing
        depth_b, depth_f = 0.062 * b, 0.066 * b * (1.08 if a["build"] == "heavy" else 1.0)
        stride = rng.uniform(0.12, 0.45)
        swing = rng.uniform(0.1, 0.5)
        near_sign = rng.choice((-1.0, 1.0))  # which leg is forward
        # far limbs first, dimmed (they are in shadow)
        far_hand = draw_arm((0.0, sh_y + 0.01), -near_sign * d * swing, d * 0.15, 0.78)
        del far_hand
        far_ank = draw_leg((0.0, hip_y), -near_sign * d * stride, -near_sign * d * 0.05 + d * 0.15, 0.82)
        draw_shoe(far_ank, d, 0.82)
        near_ank = draw_leg((0.0, hip_y), near_sign * d * stride, d * (0.25 if near_sign < 0 else 0.05), 1.0)
        draw_shoe(near_ank, d, 1.0)
        if a["lower_type"] in ("trousers", "shorts"):
            cv.poly(
                [
                    (-d * depth_b, hip_y - 0.03),
                    (d * depth_f, hip_y - 0.03),
                    (d * depth_f * 0.8, hip_y + 0.05),
                    (-d * depth_b * 0.8, hip_y + 0.05),
                ],
                low_c,
            )
        elif a["lower_type"] == "skirt":
            cv.poly(
                [
                    (-d * depth_b, 0.46),
                    (d * depth_f, 0.46),
                    (d * (depth_f + 0.05), 0.68),
                    (-d * (depth_b + 0.05), 0.68),
                ],
                low_c,
            )
        boxes["lower"] = cv.p(-depth_b, hip_y) + cv.p(depth_f, 0.9)
        if a["bag"] == "backpack":
            boxes["bag"] = cv.rect(-d * depth_b, 0.19, -d * (depth_b + 0.07), 0.4, bag_c)
        if a["bag"] == "shoulder bag" and a["bag_side"] != view:  # peeks out behind the hip
            boxes["bag"] = cv.rect(-d * (depth_b - 0.02), 0.43, -d * (depth_b + 0.03), 0.52, bag_c)
        hem_half = 0.02 * b if a["upper_type"] == "coat" else 0.0
        torso = [
            (-d * 0.03, 0.145),
            (d * 0.03, 0.145),
            (d * depth_f, 0.2),
            (d * depth_f * 1.02, 0.36),
            (d * (depth_f * 0.95 + hem_half), hem),
            (-d * (depth_b + hem_half), hem),
            (-d * depth_b, 0.2),
        ]
        cv.poly(torso, up_c)
        if a["upper_type"] == "sweater":
            cv.rect(-depth_b, hem - 0.02, depth_f, hem, _shade(up_c, 0.8))
        cv.rect(-0.018, 0.11, 0.018, 0.155, skin)
        head_y, rx, ry = 0.068, 0.044, 0.062
        if a["hair_length"] == "long":
            cv.poly([(-d * 0.01, 0.03), (-d * 0.05, 0.05), (-d * 0.058, 0.29), (-d * 0.015, 0.28)], hair_c)
        cv.ellipse(d * 0.006, head_y, rx, ry, skin)
        cv.chord_top(0, head_y - 0.002, rx * 1.04, ry * 1.02, hair_c)
        cv.ellipse(-d * 0.02, head_y + 0.004, rx * 0.75, ry * 0.8, hair_c)  # back of the head
        cv.ellipse(d * 0.028, head_y + 0.002, 0.004, 0.003, (40, 30, 30))  # eye
        if a["glasses"]:
            g = (20, 20, 24)
            boxes["glasses"] = cv.rect(d * 0.018, head_y - 0.006, d * 0.045, head_y + 0.006, g)
            cv.limb((d * 0.018, head_y - 0.003), (-d * 0.02, head_y - 0.005), 0.004, g)
        if a["bag"] == "backpack":  # strap over the shoulder
            cv.limb((-d * 0.01, 0.16), (d * depth_f * 0.7, 0.36), 0.018, bag_c)
        near_hand = draw_arm((0.0, sh_y + 0.01), near_sign * d * swing, d * 0.15, 1.0)
        if a["bag"] == "handbag" and a["bag_side"] == view:
            draw_handbag(near_hand)
        if a["bag"] == "shoulder bag":
            cv.limb((0.0, 0.17), (0.0, 0.45), 0.012, _shade(bag_c, 0.85))
            if a["bag_side"] == view:
                boxes["bag"] = cv.rect(-0.045, 0.44, 0.045, 0.53, bag_c)
        head_top = head_y
    if a["hat"]:
        hat_c = COLORS[a["hat"]]
        boxes["hat"] = cv.chord_top(0, head_top - 0.012, 0.05, 0.05, hat_c)
        brim_x = 0.0 if not side_view else facing * 0.03
        cv.rect(brim_x - 0.055, head_top - 0.016, brim_x + 0.055, head_top - 0.008, _shade(hat_c, 0.85))

    # --- occlusion: a patch of background-like texture over part of the body ---------------------
    occlusion, occ_box = None, None
    r = rng.random()
    if r < 0.1:
        occlusion = "bottom"
        y0 = int(cv.p(0, rng.uniform(0.78, 0.95))[1])
        occ_box = (0, y0, w, h)
    elif r < 0.2:
        occlusion = "side"
        ow = int(w * rng.uniform(0.15, 0.3))
        x0 = 0 if rng.random() < 0.5 else w - ow
        y0 = int(h * rng.uniform(0.0, 0.5))
        occ_box = (x0, y0, x0 + ow, h)
    if occ_box is not None:
        ox0, oy0, ox1, oy1 = occ_box
        if ox1 > ox0 and oy1 > oy0:
            patch = _texture(rng, oy1 - oy0, ox1 - ox0, _muted(rng, 50, 200, 14), rng.uniform(5, 15))
            img.paste(Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)), (ox0, oy0))
    hidden = sorted(
        name
        for name, box in boxes.items()
        if name in ("shoes", "bag", "logo", "hat", "glasses") and occ_box and _covered(box, occ_box) >= 0.4
    )

    # --- camera: lighting, colour cast, blur, noise --------------------------------------------
    contrast = rng.uniform(0.88, 1.12)
    gain = rng.uniform(0.87, 1.13) * rng.uniform(0.97, 1.03, 3)
    levels = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.clip(((levels - 128.0) * contrast + 128.0) * g, 0, 255) for g in gain])
    img = img.point(np.round(lut).astype(np.uint8).tolist())  # per-channel contrast and gain
    centre = rng.uniform(3.0, 14.0) * (384 / h)  # small images get less blur
    if centre < 14.0:
        img = img.filter(ImageFilter.Kernel((3, 3), (1, 2, 1, 2, centre, 2, 1, 2, 1)))
    ramp = 1.0 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, w, dtype=np.float32)  # light from one side
    arr = np.asarray(img, dtype=np.float32) * ramp[None, :, None]
    arr += rng.standard_normal((h, w, 1), dtype=np.float32) * rng.uniform(1.5, 6.0)  # luminance noise
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * 2.0
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))

    ty0, ty1 = cv.p(0, 0.39)[1], cv.p(0, 0.46)[1]  # below logo, hair and backpack; above the hem
    half = (0.03 if side_view else ww * 0.45) * u
    torso_box = [int(round(cx - half)), int(round(ty0)), int(round(cx + half)) + 1, int(round(ty1)) + 1]
    info = {"view": view, "occlusion": occlusion, "hidden": hidden, "torso_box": torso_box}
    return out, info


def _garment_details(
    cv: _Canvas,
    a: dict[str, Any],
    view: str,
    up_c: tuple[int, int, int],
    skin: tuple[int, int, int],
    sw: float,
    ww: float,
    hem: float,
) -> None:
    """Small cues of the garment type (collar, zip, buttons, rib bands) on a front / back torso."""
    t = a["upper_type"]
    dark, light = _shade(up_c, 0.72), _shade(up_c, 1.18)
    if t == "t-shirt" and view == "front":
        cv.ellipse(0, 0.148, 0.03, 0.014, skin)
    elif t == "shirt":
        if view == "front":
            for s in (-1.0, 1.0):
                cv.poly([(0, 0.17), (s * 0.035, 0.14), (s * 0.045, 0.18)], light)
            for y in (0.22, 0.29, 0.36, 0.43):
                cv.ellipse(0, y, 0.004, 0.003, dark)
        else:
            cv.rect(-0.035, 0.14, 0.035, 0.155, light)
    elif t in ("jacket", "coat"):
        if view == "front":
            cv.limb((0, 0.16), (0, hem - 0.005), 0.008, dark)
            for s in (-1.0, 1.0):
                cv.poly([(s * 0.005, 0.16), (s * 0.04, 0.14), (s * 0.05, 0.21)], dark)
            if t == "coat":
                for y in (0.28, 0.4, 0.52):
                    cv.ellipse(0.018, y, 0.005, 0.004, dark)
        cv.rect(-ww - 0.01, hem - 0.015, ww + 0.01, hem, dark)
    elif t == "sweater":
        cv.rect(-ww, hem - 0.025, ww, hem, dark)
        if view == "front":
            cv.ellipse(0, 0.148, 0.032, 0.015, dark)


def _logo(
    cv: _Canvas, shape: str, color: tuple[int, int, int], x: float, y: float, r: float
) -> tuple[float, ...]:
    if shape == "circle":
        return cv.ellipse(x, y, r, r * 0.75, color)
    if shape == "triangle":
        cv.poly([(x - r, y + r * 0.7), (x + r, y + r * 0.7), (x, y - r * 0.8)], color)
        return cv.p(x - r, y - r * 0.8) + cv.p(x + r, y + r * 0.7)
    return cv.rect(x - r, y - r * 0.7, x + r, y + r * 0.7, color)


def _union(a: tuple[float, ...] | None, b: tuple[float, ...]) -> tuple[float, ...]:
    if a is None:
        return tuple(b)
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _covered(box: tuple[float, ...], occ: tuple[int, int, int, int]) -> float:
    """Fraction of ``box`` inside ``occ`` (both x0, y0, x1, y1)."""
    ix = max(0.0, min(box[2], occ[2]) - max(box[0], occ[0]))
    iy = max(0.0, min(box[3], occ[3]) - max(box[1], occ[1]))
    area = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
    return ix * iy / area


# ----------------------------------------------------------------------------- dataset


def _splits(identities: int, seed: int) -> dict[int, str]:
    """Identity-disjoint ~70/15/15 split; val and test get at least one identity each."""
    perm = _rng(seed, 4).permutation(identities) + 1
    n_test = max(1, round(0.15 * identities))
    n_val = max(1, round(0.15 * identities))
    split = {}
    for i, pid in enumerate(perm.tolist()):
        split[pid] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return split


def _id_width(identities: int) -> int:
    return max(4, len(str(identities)))


def _render_identity(job: tuple[Path, int, dict[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Render and write every image of one identity; returns its records with view info."""
    root, pid, attrs, p = job
    width = _id_width(p["identities"])
    size = tuple(p["size"])
    folder = root / "imgs" / "synth" / f"{pid:0{width}d}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for j in range(p["images_per_identity"]):
        img, info = render_image(attrs, _rng(p["seed"], 1, pid, j), size)  # type: ignore[arg-type]
        rel = f"synth/{pid:0{width}d}/{pid:0{width}d}_{j:02d}.jpg"
        img.save(root / "imgs" / rel, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=False)
        crng = _rng(p["seed"], 2, pid, j)
        captions = [
            describe(attrs, crng, view=info["view"], hidden=info["hidden"])
            for _ in range(p["captions_per_image"])
        ]
        out.append({"file_path": rel, "captions": captions, "info": info})
    return out


def _params(
    identities: int, images_per_identity: int, captions_per_image: int, seed: int, size: tuple[int, int]
) -> dict[str, Any]:
    return {
        "generator": "tpr_core.data.synth",
        "version": GENERATOR_VERSION,
        "identities": int(identities),
        "images_per_identity": int(images_per_identity),
        "captions_per_image": int(captions_per_image),
        "seed": int(seed),
        "size": [int(size[0]), int(size[1])],
    }


def _check_existing(out: Path, params: dict[str, Any]) -> bool:
    """True when ``out`` already holds this dataset; raise when it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise SynthError(f"{out}: exists and is not a folder")
    meta, raw = out / "synth.json", out / "reid_raw.json"
    if not raw.exists():
        if any(out.iterdir()):
            raise SynthError(
                f"{out}: exists, is not empty and has no reid_raw.json; remove it or pick another --out"
            )
        return False  # an empty folder: generate into it
    if not meta.exists():
        raise SynthError(f"{meta}: missing; {out} holds a dataset not written by the synthetic generator")
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SynthError(f"{meta}: unreadable ({e})") from None
    diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
    if diff:
        said = ", ".join(f"{k}: existing {o!r} vs requested {n!r}" for k, (o, n) in sorted(diff.items()))
        raise SynthError(
            f"{meta}: {out} was generated with other parameters ({said}); remove it or pick another --out"
        )
    return True


def _summary(out: Path, raw: list[dict[str, Any]], reused: bool, seconds: float) -> dict[str, Any]:
    ids: dict[str, set[int]] = {s: set() for s in SPLITS}
    images = dict.fromkeys(SPLITS, 0)
    captions = dict.fromkeys(SPLITS, 0)
    for r in raw:
        ids[r["split"]].add(r["id"])
        images[r["split"]] += 1
        captions[r["split"]] += len(r["captions"])
    return {
        "path": str(out),
        "reused": reused,
        "identities": {s: len(ids[s]) for s in SPLITS},
        "images": images,
        "captions": captions,
        "seconds": round(seconds, 2),
    }


def generate(
    out: str | os.PathLike,
    identities: int = 300,
    images_per_identity: int = 4,
    captions_per_image: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (384, 128),
    workers: int | None = None,
) -> dict[str, Any]:
    """Write (or reuse) a synthetic dataset in the CUHK-PEDES layout.

    The folder appears atomically: it is written to ``OUT.tmp-<pid>`` and renamed. If ``out``
    already holds a dataset generated with the same parameters it is reused as is.

    Args:
        out: Output folder.
        identities: Number of identities (ids 1..N), at least 3 (one per split).
        images_per_identity: Images per identity.
        captions_per_image: Captions per image.
        seed: Generator seed; the same arguments give the same bytes.
        size: Image (height, width) in pixels, at least 16x8.
        workers: Processes rendering images (default: 2, or 1 for small sets); the output does
            not depend on it.

    Returns:
        A printable summary: path, reused, and identities / images / captions per split.

    Raises:
        SynthError: ``out`` exists with other parameters or holds something else.
        ValueError: Bad arguments.
    """
    start = time.perf_counter()
    out = Path(out)
    if identities < 3:
        raise ValueError(f"identities must be >= 3 (one per split), got {identities}")
    if images_per_identity < 1 or captions_per_image < 1:
        raise ValueError(
            "images_per_identity and captions_per_image must be >= 1, got "
            f"{images_per_identity} and {captions_per_image}"
        )
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 8:
        raise ValueError(f"size must be at least 16x8 (HxW), got {h}x{w}")
    params = _params(identities, images_per_identity, captions_per_image, seed, (h, w))
    if _check_existing(out, params):
        raw = json.loads((out / "reid_raw.json").read_text())
        return _summary(out, raw, True, time.perf_counter() - start)

    attrs = make_identities(identities, seed)
    split = _splits(identities, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        jobs = [(tmp, pid, attrs[pid], params) for pid in range(1, identities + 1)]
        n_images = identities * images_per_identity
        if workers is None:
            workers = 1 if n_images * h * w < 200 * 384 * 128 else min(2, os.cpu_count() or 1)
        if workers > 1 and "fork" in get_all_start_methods():
            # fork, as torch's DataLoader: spawn/forkserver would re-run an unguarded __main__ (a
            # script, a Ray worker) in every child. Children only touch numpy, PIL and files.
            # map() returns results in identity order whatever the scheduling.
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as ex:
                results = list(ex.map(_render_identity, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
        else:
            results = [_render_identity(j) for j in jobs]

        raw, views = [], {}
        for pid, recs in zip(range(1, identities + 1), results, strict=True):
            for r in recs:
                raw.append(
                    {
                        "split": split[pid],
                        "captions": r["captions"],
                        "file_path": r["file_path"],
                        "id": pid,
                        "processed_tokens": [_tokens(c) for c in r["captions"]],
                    }
                )
                views[r["file_path"]] = r["info"]
        (tmp / "reid_raw.json").write_text(json.dumps(raw))
        (tmp / "attributes.json").write_text(json.dumps({str(k): v for k, v in attrs.items()}, indent=1))
        (tmp / "views.json").write_text(json.dumps(views, indent=1))
        (tmp / "synth.json").write_text(json.dumps(params, indent=1, sort_keys=True))  # last: marks complete
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            # Another process finished the same folder first: keep theirs if it matches.
            if _check_existing(out, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return _summary(out, raw, True, time.perf_counter() - start)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(out, raw, False, time.perf_counter() - start)


def ensure_synthetic(
    out: str | os.PathLike,
    identities: int = 300,
    images_per_identity: int = 4,
    captions_per_image: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (384, 128),
) -> Path:
    """Generate the dataset at ``out`` unless it is already there with the same parameters.

    Args:
        out: Output folder.
        identities: Number of identities.
        images_per_identity: Images per identity.
        captions_per_image: Captions per image.
        seed: Generator seed.
        size: Image (height, width).

    Returns:
        ``out`` as a Path (holding reid_raw.json and imgs/).

    Raises:
        SynthError: ``out`` exists with other parameters or holds something else.
    """
    generate(
        out,
        identities=identities,
        images_per_identity=images_per_identity,
        captions_per_image=captions_per_image,
        seed=seed,
        size=size,
    )
    return Path(out)
