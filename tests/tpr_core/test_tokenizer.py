"""Tokenizers: trained BPE, a local CLIP one and a local BERT one; BOS/EOS, padding, truncation, save/load."""

from __future__ import annotations

import json
import string

import pytest
import torch

from tpr_core.data.tokenizer import BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, Tokenizer

CAPTIONS = [
    "A woman with long black hair is wearing a red shirt, blue jeans and white shoes.",
    "The man wears a grey jacket and black pants, he carries a black backpack.",
    "A young girl in a pink dress with a white handbag.",
    "She is wearing a white shirt and a black skirt, and she has short brown hair.",
] * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=400, max_length=24)


def test_trained_special_tokens(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert {bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id} == bpe.special_ids
    assert len(bpe.special_ids) == 4  # all distinct for the trained tokenizer
    assert bpe.mask_id < bpe.vocab_size  # the embedding table must include the mask token
    assert bpe.vocab_size <= 400


def test_round_trip_lowercases_and_collapses_spaces(bpe: Tokenizer) -> None:
    text = "A  Woman wears a RED shirt,   and BLACK shoes!"
    ids, mask = bpe.encode([text])
    assert bpe.decode(ids[0]) == "a woman wears a red shirt, and black shoes!"
    assert torch.equal(bpe.encode(["RED Shirt"])[0], bpe.encode(["red shirt"])[0])


def test_mask_marks_bos_to_eos_and_pads_the_rest(bpe: Tokenizer) -> None:
    text = "a red shirt"
    body = bpe.tokenize(text)
    ids, mask = bpe.encode([text, "a"], max_length=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.long
    n = len(body) + 2
    assert ids[0, :n].tolist() == [bpe.bos_id, *body, bpe.eos_id]
    assert mask[0].tolist() == [1] * n + [0] * (12 - n)
    assert (ids[0, n:] == bpe.pad_id).all()
    assert int(mask[1].sum()) == len(bpe.tokenize("a")) + 2


def test_truncation_keeps_eos(bpe: Tokenizer) -> None:
    text = " ".join(["red shirt and blue jeans"] * 20)
    body = bpe.tokenize(text)
    assert len(body) > 30
    ids, mask = bpe.encode([text], max_length=10)
    assert ids[0].tolist() == [bpe.bos_id, *body[:8], bpe.eos_id]
    assert mask[0].tolist() == [1] * 10
    default, _ = bpe.encode([text])  # default length from the constructor
    assert default.shape == (1, 24) and default[0, -1] == bpe.eos_id


def test_training_is_deterministic(bpe: Tokenizer, tmp_path) -> None:
    again = Tokenizer.train(CAPTIONS, vocab_size=400, max_length=24)
    bpe.save(tmp_path / "a")
    again.save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_save_load_identity(bpe: Tokenizer, tmp_path) -> None:
    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tpr_tokenizer.json").read_text())
    assert meta["kind"] == "bpe" and meta["ids"]["mask"] == bpe.mask_id
    assert meta["tokens"] == {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "pad": PAD_TOKEN, "mask": MASK_TOKEN}
    loaded = Tokenizer.load(tmp_path / "tok")
    for attr in ("kind", "vocab_size", "pad_id", "bos_id", "eos_id", "mask_id", "special_ids", "max_length"):
        assert getattr(loaded, attr) == getattr(bpe, attr), attr
    a, ma = bpe.encode(CAPTIONS[:4])
    b, mb = loaded.encode(CAPTIONS[:4])
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_load_errors_name_the_file_and_field(bpe: Tokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tpr_tokenizer.json"):
        Tokenizer.load(tmp_path / "nothing")
    d = bpe.save(tmp_path / "tok")
    meta = json.loads((d / "tpr_tokenizer.json").read_text())
    meta["ids"]["mask"] = 0
    (d / "tpr_tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tpr_tokenizer.json: field ids.mask"):
        Tokenizer.load(d)


def test_too_small_vocab_is_an_error() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CAPTIONS, vocab_size=100)


# ------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP tokenizer saved with save_pretrained: letters, a few BPE merges."""
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + ".,":
            vocab[c + suffix] = len(vocab)
    merges = ["r e", "re d</w>", "a n</w>", "m an</w>", "s h", "i r", "ir t</w>", "sh irt</w>"]
    for m in merges:
        a, b = m.split()
        vocab[a + b] = len(vocab)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    hf.save_pretrained(d / "saved")
    return d / "saved", hf, vocab


def test_from_clip_matches_the_hf_tokenizer(tiny_clip_dir) -> None:
    path, hf, vocab = tiny_clip_dir
    tok = Tokenizer.from_clip(path, max_length=10)
    assert tok.kind == "clip"
    assert tok.vocab_size == len(vocab) + 1  # the mask token is appended
    assert tok.mask_id == len(vocab)
    assert tok.bos_id == vocab[BOS_TOKEN] and tok.eos_id == vocab[EOS_TOKEN]
    assert tok.pad_id == tok.eos_id  # CLIP pads with <|endoftext|>
    text = "A Red shirt, man."
    expected = hf(text)["input_ids"]  # BOS a red shirt , man . EOS
    assert expected == [
        vocab[BOS_TOKEN],
        vocab["a</w>"],
        vocab["red</w>"],
        vocab["shirt</w>"],
        vocab[",</w>"],
        vocab["man</w>"],
        vocab[".</w>"],
        vocab[EOS_TOKEN],
    ]
    ids, mask = tok.encode([text])
    assert ids[0].tolist() == expected + [tok.pad_id] * 2
    assert mask[0].tolist() == [1] * 8 + [0] * 2
    assert tok.decode(ids[0]) == "a red shirt , man ."
    trunc, tmask = tok.encode(["red red red red red"], max_length=4)
    assert trunc[0].tolist() == [tok.bos_id, vocab["red</w>"], vocab["red</w>"], tok.eos_id]


def test_from_clip_save_load(tiny_clip_dir, tmp_path) -> None:
    tok = Tokenizer.from_clip(tiny_clip_dir[0])
    loaded = Tokenizer.load(tok.save(tmp_path / "clip_tok"))
    assert loaded.kind == "clip" and loaded.mask_id == tok.mask_id and loaded.vocab_size == tok.vocab_size
    assert torch.equal(loaded.encode(["a red shirt"])[0], tok.encode(["a red shirt"])[0])
    # the mask token is one token, not split into characters
    assert loaded.tokenize(MASK_TOKEN) == [tok.mask_id]


def test_from_clip_missing_dir(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not_here"):
        Tokenizer.from_clip(tmp_path / "not_here")


# ------------------------------------------------------------------------- BERT

BERT_WORDS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "a", "man", "woman"]
BERT_WORDS += ["in", "red", "shirt", "bag", "with", "black", "##s", "##pack", "back", "cafe"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A BERT-uncased tokenizer folder: vocab.txt and the tokenizer_config.json of bert-base-uncased."""
    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return d


def test_from_bert_matches_the_hf_tokenizer(tiny_bert_dir) -> None:
    from transformers import BertTokenizerFast

    tok = Tokenizer.from_bert(tiny_bert_dir, max_length=20)
    hf = BertTokenizerFast.from_pretrained(str(tiny_bert_dir), local_files_only=True)
    assert tok.kind == "bert"
    # BERT's own ids, nothing appended: the vocabulary is vocab.txt's.
    assert tok.vocab_size == len(BERT_WORDS) == len(hf)
    v = {w: i for i, w in enumerate(BERT_WORDS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (
        v["[CLS]"],
        v["[SEP]"],
        v["[PAD]"],
        v["[MASK]"],
    )
    assert tok.special_ids == {v["[CLS]"], v["[SEP]"], v["[PAD]"], v["[MASK]"]}
    for text in (
        "A Man in RED shirts, with a BACKPACK.",
        "a woman  with black bags",
        "Café woman",  # accents stripped with the lower case, as bert-base-uncased
        "a [MASK] man",  # the mask token stays one token
        "unknown words here",
    ):
        want = hf(text)["input_ids"]
        ids, mask = tok.encode([text])
        n = len(want)
        assert ids[0, :n].tolist() == want, text
        assert (ids[0, n:] == tok.pad_id).all() and mask[0].tolist() == [1] * n + [0] * (20 - n)
    ids, _ = tok.encode(["A Man in RED shirts, with a BACKPACK."])
    assert ids[0, :4].tolist() == [v["[CLS]"], v["a"], v["man"], v["in"]]
    assert tok.decode(ids[0]) == hf.decode(
        hf("A Man in RED shirts, with a BACKPACK.")["input_ids"], skip_special_tokens=True
    )
    assert tok.decode(ids[0]) == "a man in red shirts, with a backpack."
    long, lmask = tok.encode(["a red shirt " * 10], max_length=6)
    assert long[0].tolist() == [v["[CLS]"], v["a"], v["red"], v["shirt"], v["a"], v["[SEP]"]]
    assert lmask[0].tolist() == [1] * 6


def test_from_bert_save_load_without_the_folder(tiny_bert_dir, tmp_path) -> None:
    import shutil

    src = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, src)
    tok = Tokenizer.from_bert(src, max_length=16)
    saved = tok.save(tmp_path / "bert_tok")
    shutil.rmtree(src)  # the run's tokenizer is self-contained
    meta = json.loads((saved / "tpr_tokenizer.json").read_text())
    assert meta["kind"] == "bert"
    assert meta["tokens"] == {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
    loaded = Tokenizer.load(saved)
    for attr in ("kind", "vocab_size", "pad_id", "bos_id", "eos_id", "mask_id", "special_ids", "max_length"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    texts = ["A man with a BLACK bag.", "a woman in a red shirt"]
    for a, b in zip(tok.encode(texts), loaded.encode(texts), strict=True):
        assert torch.equal(a, b)
    assert loaded.tokenize("[MASK]") == [tok.mask_id]
    assert loaded.decode(loaded.encode(texts)[0][0]) == "a man with a black bag."


def test_from_bert_errors_name_the_file(tiny_bert_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not_here"):
        Tokenizer.from_bert(tmp_path / "not_here")
    d = tmp_path / "bert"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"vocabulary not found: {d}/vocab.txt"):
        Tokenizer.from_bert(d)
    (d / "vocab.txt").write_text("\n".join(w for w in BERT_WORDS if w != "[MASK]") + "\n")
    with pytest.raises(ValueError, match=r"vocab.txt: no \[MASK\] token"):
        Tokenizer.from_bert(d)
    (d / "vocab.txt").write_text((tiny_bert_dir / "vocab.txt").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: do_lower_case is false"):
        Tokenizer.from_bert(d)
    (d / "tokenizer_config.json").unlink()  # no config: uncased, as BertTokenizer's default
    assert Tokenizer.from_bert(d).encode(["RED"])[0][0, 1] == BERT_WORDS.index("red")
