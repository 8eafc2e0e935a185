"""Batch views: MLM masking statistics, UIT caption pruning, IVT phrase and word levels."""

from __future__ import annotations

import pytest
import torch

from tpr_core.data.views import (
    mask_tokens,
    phrase_chunks,
    pos_tag,
    pos_tagger_name,
    prune_caption,
    word_phrases,
)

CUHK = (
    "A woman with long black hair is wearing a red short-sleeved shirt, blue jeans and white shoes. "
    "She carries a black backpack on her back."
)


class _Tok:
    """The four attributes mask_tokens reads, with a CLIP-like layout (pad == eos)."""

    vocab_size = 1000
    bos_id, eos_id, pad_id, mask_id = 997, 998, 998, 999
    special_ids = {997, 998, 999}


def _batch(b: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of random real lengths: BOS, tokens in [0, 997), EOS, pad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, length), _Tok.pad_id)
    mask = torch.zeros((b, length), dtype=torch.long)
    for r in range(b):
        n = int(torch.randint(1, length - 1, (), generator=g))  # content tokens
        ids[r, 0] = _Tok.bos_id
        ids[r, 1 : n + 1] = torch.randint(0, 997, (n,), generator=g)
        ids[r, n + 1] = _Tok.eos_id
        mask[r, : n + 2] = 1
    return ids, mask


def test_mask_tokens_statistics() -> None:
    ids, mask = _batch(600, 40)
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(ids, mask, _Tok(), 0.15, g)
    cand = mask.bool() & (ids < 997)
    chosen = labels != -100
    assert not (chosen & ~cand).any()  # never BOS, EOS, pad
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
    assert torch.equal(out[~chosen], ids[~chosen])  # everything else untouched
    rate = chosen.sum().item() / cand.sum().item()
    assert abs(rate - 0.15) < 0.015, rate  # ~11k candidates: std of the rate ~0.0034
    n = chosen.sum().item()
    masked = (out[chosen] == _Tok.mask_id).sum().item() / n
    unchanged = (out[chosen] == ids[chosen]).sum().item() / n
    replaced = 1.0 - masked - unchanged
    assert abs(masked - 0.8) < 0.03, masked
    assert abs(replaced - 0.1) < 0.025, replaced
    assert abs(unchanged - 0.1) < 0.025, unchanged
    # random replacements are never special tokens
    rep = chosen & (out != _Tok.mask_id) & (out != ids)
    assert not torch.isin(out[rep], torch.tensor([997, 998, 999])).any()


def test_mask_tokens_at_least_one_per_caption() -> None:
    ids, mask = _batch(200, 12, seed=3)
    ids[0, 1], mask[0, 1:] = _Tok.eos_id, 0  # BOS EOS only: nothing to mask
    ids[0, 2:] = _Tok.pad_id
    out, labels = mask_tokens(ids, mask, _Tok(), 0.01, torch.Generator().manual_seed(0))
    per_row = (labels != -100).sum(1)
    assert per_row[0] == 0
    assert (per_row[1:] >= 1).all()
    # with ratio 0.01 most rows get exactly the forced one
    assert (per_row[1:] == 1).float().mean() > 0.8


def test_mask_tokens_reproducible_and_validated() -> None:
    ids, mask = _batch(8, 20)
    a = mask_tokens(ids, mask, _Tok(), 0.3, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, mask, _Tok(), 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="ratio"):
        mask_tokens(ids, mask, _Tok(), 0.0)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        mask_tokens(ids[0], mask[0], _Tok(), 0.15)


def test_spacy_tagger_is_installed_and_offline() -> None:
    assert pos_tagger_name().startswith("spacy:en_core_web_sm")
    tags = dict(pos_tag("She carries a black backpack"))
    assert tags["She"] == "PRON" and tags["carries"] == "VERB" and tags["black"] == "ADJ"
    assert tags["backpack"] == "NOUN"


@pytest.mark.parametrize("tagger", ["spacy", "rules"])
def test_prune_caption_keeps_nouns_adjectives_pronouns(tagger: str) -> None:
    text = "The woman is wearing a red shirt and she has a black bag."
    words = prune_caption(text, tagger).lower().split()
    for kept in ("woman", "red", "shirt", "she", "black", "bag"):
        assert kept in words
    for dropped in ("is", "wearing", "and", "the", "a", "has"):
        assert dropped not in words
    assert words == ["woman", "red", "shirt", "she", "black", "bag"]


def test_phrase_chunks() -> None:
    assert phrase_chunks(CUHK) == [
        "A woman with long black hair is wearing a red short-sleeved shirt",
        "blue jeans and white shoes",
        "She carries a black backpack on her back",
    ]
    assert phrase_chunks(" a man ,, in 3.5 shoes , ") == ["a man", "in 3.5 shoes"]
    assert phrase_chunks("") == []


@pytest.mark.parametrize("tagger", ["spacy", "rules"])
def test_word_phrases_cuhk_sentence(tagger: str) -> None:
    assert word_phrases(CUHK, tagger) == [
        "long black hair",
        "red short-sleeved shirt",
        "blue jeans",
        "white shoes",
        "black backpack",
    ]


def test_word_phrases_hyphens_and_no_attributes() -> None:
    got = word_phrases("The man wears dark-blue jeans and a t-shirt, carrying a brown over-the-shoulder bag.")
    assert "dark-blue jeans" in got and "brown over-the-shoulder bag" in got
    assert all("t-shirt" != p for p in got)  # a bare noun is not an attribute phrase
    assert word_phrases("The man is walking.") == []
