"""Captions: a person's visible attributes written in words, in the style of CUHK-PEDES.

A caption is built from items, each a pair (finite verb phrase, participle phrase): "carries a
red backpack" / "carrying a red backpack", so one item list can be written as one sentence of
participles, one of clauses, or several sentences. Every wording choice comes from the caller's
generator, in a fixed order, so a (seed, identity, image) stream always gives the same caption.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from tpr_core.data.synth.attributes import _pick, visible_attributes

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

#: One phrase about a person: (finite verb phrase, participle phrase).
_Item = tuple[str, str]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str], rng: np.random.Generator) -> str:
    """Join phrases as "x", "x and y", "x, y and z" (or, drawn, "x, y, and z")."""
    if len(items) == 1:
        return items[0]
    sep = ", and " if len(items) > 2 and rng.random() < 0.3 else " and "
    return ", ".join(items[:-1]) + sep + items[-1]


def _serial(items: list[str]) -> str:
    """Join clauses with a serial comma: "x", "x, and y", "x, y, and z"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


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
        logo = _a(v["logo"])
        post.append(
            _pick(
                rng,
                (f"{logo} logo on the front", f"{logo} print on the chest", f"{logo} pattern on the front"),
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


def _hair_np(v: dict[str, Any]) -> str:
    return f"{v['hair_length']} {v['hair_color']} hair"


def _bag_forms(v: dict[str, Any], his: str, rng: np.random.Generator) -> _Item:
    """The item about the visible bag."""
    c, kind = v["bag_color"], v["bag"]
    word = _pick(rng, _BAG_WORDS[kind])
    bag = _a(c + " " + word)
    if v["bag_part"] == "straps":
        return _pick(
            rng,
            (
                (
                    f"has the straps of {bag} over {his} shoulders",
                    f"with the straps of {bag} over {his} shoulders",
                ),
                (f"carries {bag}", f"carrying {bag}"),
                (
                    f"wears {bag} whose straps show on {his} shoulders",
                    f"with {c} {word} straps on {his} shoulders",
                ),
            ),
        )
    side = v["bag_side"]
    if kind == "backpack":
        return _pick(
            rng,
            (
                (f"carries {bag} on {his} back", f"carrying {bag} on {his} back"),
                (f"has {bag}", f"with {bag}"),
                (f"is carrying {bag}", f"carrying {bag}"),
            ),
        )
    if kind == "handbag":
        where = f" in {his} {side} hand" if rng.random() < 0.5 else ""
        return _pick(
            rng,
            (
                (f"holds {bag}{where}", f"holding {bag}{where}"),
                (f"carries {bag}{where}", f"carrying {bag}{where}"),
            ),
        )
    where = f" on {his} {side} side" if rng.random() < 0.5 else ""
    return _pick(
        rng,
        (
            (f"has {bag}{where}", f"with {bag}{where}"),
            (f"carries {bag}{where}", f"carrying {bag}{where}"),
            (f"is carrying {bag} over {his} shoulder", f"carrying {bag} over {his} shoulder"),
        ),
    )


def _subject(v: dict[str, Any], rng: np.random.Generator) -> str:
    """The subject ("A man", "The heavyset lady"): determiner, sometimes a build adjective, noun."""
    noun = _pick(rng, _NOUNS[v["gender"]])
    adj = ""
    if v["build"] in _BUILD_ADJ and rng.random() < 0.4:
        adj = _pick(rng, _BUILD_ADJ[v["build"]]) + " "
    det = _pick(rng, ("A", "A", "A", "The", "This"))
    return f"{det} {adj}{noun}"


def _clothing(v: dict[str, Any], rng: np.random.Generator) -> tuple[_Item, str | None]:
    """The item naming the worn clothes in one list, and the shoes when they get their own item."""
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
    return (f"{wear[0]} {worn}", f"{wear[1]} {worn}"), shoes_sep


def _extras(
    v: dict[str, Any], his: str, shoes_sep: str | None, rng: np.random.Generator
) -> tuple[list[_Item], str]:
    """The items besides the clothes, in a drawn order, and the hair when it goes into the subject."""
    extras: list[_Item] = []
    modifier = ""
    if rng.random() > 0.15:
        hair = _hair_np(v)
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
    return [extras[i] for i in rng.permutation(len(extras))], modifier


def _sentences(subject: str, items: list[_Item], he: str, rng: np.random.Generator) -> str:
    """Write the items after the subject in one of four drawn sentence styles."""
    style = rng.random()
    if style < 0.3:  # one sentence, participles: "A woman wearing X, Y and Z, with ..., carrying ..."
        return f"{subject} " + ", ".join(it[1] for it in items) + "."
    if style < 0.55 or len(items) == 1:  # one sentence, finite clauses joined with commas
        return f"{subject} {_serial([it[0] for it in items])}."
    if style < 0.9:  # two sentences: the first item(s), then the rest after a pronoun
        k = 1 if rng.random() < 0.7 else min(2, len(items) - 1)
        first = _join([it[0] for it in items[:k]], rng)
        rest = _serial([it[0] for it in items[k:]])
        return f"{subject} {first}. {he.capitalize()} {rest}."
    # a sentence per item
    parts = [f"{subject} {items[0][0]}."] + [f"{he.capitalize()} {it[0]}." for it in items[1:]]
    return " ".join(parts)


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
    he, his = ("he", "his") if v["gender"] == "man" else ("she", "her")
    subject = _subject(v, rng)
    clothing, shoes_sep = _clothing(v, rng)
    extras, modifier = _extras(v, his, shoes_sep, rng)
    # The clothing item usually comes first, as in most CUHK-PEDES captions.
    pos = 0 if rng.random() < 0.7 else int(rng.integers(len(extras) + 1))
    items = [*extras[:pos], clothing, *extras[pos:]]
    text = _sentences(subject + modifier, items, he, rng)
    return text[0].upper() + text[1:]


def _tokens(caption: str) -> list[str]:
    """CUHK-PEDES ``processed_tokens`` of a caption: its lowercase words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", caption.lower())
