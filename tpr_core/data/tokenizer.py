"""Caption tokenizers: trained from scratch on the training captions, a local CLIP one, or a
local BERT (uncased WordPiece) one.

All kinds are held as a Hugging Face ``tokenizers.Tokenizer`` (the fast Rust backend)
and behave the same way: lower-cased text, ``BOS tokens EOS`` then padding to
``max_length``; an over-long caption is truncated so that EOS stays the last real
token (the CLIP text encoder pools at EOS, so losing it would pool at a random word).
A mask token always exists, for masked-language modelling: ``<|mask|>`` (appended for
CLIP), BERT's own ``[MASK]``.

A tokenizer is saved as a directory: ``tokenizer.json`` (the ``tokenizers`` file) and
``tpr_tokenizer.json`` (kind, special tokens and their ids, max length), so a checkpoint
carries it and :meth:`Tokenizer.load` needs neither ``transformers`` nor the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
# BERT's special tokens (bert-base-uncased vocab.txt): [CLS] opens a text, [SEP] closes it.
BERT_CLS_TOKEN = "[CLS]"
BERT_SEP_TOKEN = "[SEP]"
BERT_PAD_TOKEN = "[PAD]"
BERT_MASK_TOKEN = "[MASK]"
BERT_UNK_TOKEN = "[UNK]"
BERT_VOCAB_FILE = "vocab.txt"

_BACKEND_FILE = "tokenizer.json"
_META_FILE = "tpr_tokenizer.json"


class Tokenizer:
    """Lower-casing caption tokenizer with BOS/EOS, padding, truncation and a mask token.

    Build one with :meth:`train`, :meth:`from_clip`, :meth:`from_bert` or :meth:`load`.

    Attributes:
        kind: ``"bpe"`` (trained on captions), ``"clip"`` (from a CLIP directory) or
            ``"bert"`` (from a BERT folder's ``vocab.txt``).
        vocab_size: number of ids, the mask token included (size of the embedding table).
        pad_id, bos_id, eos_id, mask_id: special token ids (``pad_id`` may equal
            ``eos_id`` for CLIP, whose pad token is ``<|endoftext|>``).
        special_ids: the set of the special ids above.
        max_length: default padded length ``L`` of :meth:`encode`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        kind: str,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        mask_token: str,
        max_length: int = 77,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}")
        # Truncation and padding are done here, so that EOS survives truncation.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self.kind = kind
        self.max_length = int(max_length)
        self.tokens = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "mask": mask_token}
        ids: dict[str, int] = {}
        for role, tok in self.tokens.items():
            tid = backend.token_to_id(tok)
            if tid is None:
                raise ValueError(f"tokenizer ({kind}) has no {role} token {tok!r} in its vocabulary")
            ids[role] = tid
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.mask_id: int = ids["mask"]
        self.special_ids: set[int] = set(ids.values())
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 8192, max_length: int = 77) -> Tokenizer:
        """Train a byte-level BPE tokenizer on captions (deterministic for the same input).

        Byte-level BPE has all 256 byte symbols in its alphabet, so no caption ever maps
        to an unknown token, whatever characters the test split brings.

        Args:
            captions: training captions (iterated once).
            vocab_size: upper bound on the vocabulary, special tokens included; the
                trainer stops earlier when no pair occurs twice.
            max_length: default padded length.
        """
        specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN]
        min_size = 256 + len(specials) + 1
        if vocab_size < min_size:
            raise ValueError(
                f"vocab_size must be >= {min_size} (256 bytes + special tokens), got {vocab_size}"
            )
        backend = _Backend(models.BPE())
        # As CLIP does: NFC, whitespace runs to one space, lower case.
        backend.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.Replace(Regex(r"\s+"), " "),
                normalizers.Strip(),
                normalizers.Lowercase(),
            ]
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator((str(c) for c in captions), trainer=trainer)
        return cls(
            backend,
            kind="bpe",
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            mask_token=MASK_TOKEN,
            max_length=max_length,
        )

    @classmethod
    def from_clip(cls, path: str | Path, max_length: int = 77) -> Tokenizer:
        """The tokenizer of a local Hugging Face CLIP directory, plus a ``<|mask|>`` token.

        Loaded with ``local_files_only=True``: nothing is downloaded. The mask token is
        appended to the vocabulary (``vocab_size`` grows by one; the text embedding must
        be resized to match). Padding uses the CLIP pad token if it has one, else EOS.

        Args:
            path: directory written by ``save_pretrained`` (``vocab.json`` + ``merges.txt``
                or ``tokenizer.json``).
            max_length: default padded length.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer directory not found: {path}")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a CLIP tokenizer from {path}: {e}") from e
        if hf.bos_token is None or hf.eos_token is None:
            raise ValueError(f"tokenizer in {path} has no bos_token/eos_token; is it a CLIP tokenizer?")
        backend = _Backend.from_str(hf.backend_tokenizer.to_str())
        if backend.token_to_id(MASK_TOKEN) is None:
            backend.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
        pad_token = hf.pad_token if hf.pad_token is not None else hf.eos_token
        return cls(
            backend,
            kind="clip",
            bos_token=str(hf.bos_token),
            eos_token=str(hf.eos_token),
            pad_token=str(pad_token),
            mask_token=MASK_TOKEN,
            max_length=max_length,
        )

    @classmethod
    def from_bert(cls, path: str | Path, max_length: int = 77) -> Tokenizer:
        """The uncased WordPiece tokenizer of a local Hugging Face BERT folder (its ``vocab.txt``).

        Built with the ``tokenizers`` library as ``BertTokenizerFast`` builds bert-base-uncased's:
        BERT's normalizer (control characters removed, CJK characters split, lower case,
        accents stripped), BERT's pre-tokenizer (whitespace and punctuation), WordPiece with
        ``[UNK]`` and ``##`` continuations. BOS is ``[CLS]``, EOS ``[SEP]``, padding ``[PAD]``
        and the mask ``[MASK]``: no token is added, so ``vocab_size`` is the number of lines
        of ``vocab.txt`` and the ids are the ones BERT's word embeddings were trained with.
        Nothing is downloaded; the saved tokenizer loads without the BERT folder.

        Args:
            path: a BERT folder holding ``vocab.txt`` (e.g. bert-base-uncased).
            max_length: default padded length, ``[CLS]`` and ``[SEP]`` included.

        Raises:
            FileNotFoundError: the folder or its ``vocab.txt`` is missing.
            ValueError: a special token is missing from ``vocab.txt``, the vocabulary repeats
                a token, or the folder's ``tokenizer_config.json`` says the model is cased.
        """
        d = Path(path).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"BERT tokenizer directory not found: {d}")
        vocab_file = d / BERT_VOCAB_FILE
        if not vocab_file.is_file():
            raise FileNotFoundError(f"BERT tokenizer vocabulary not found: {vocab_file}")
        config_file = d / "tokenizer_config.json"
        if config_file.is_file():
            try:
                lower = json.loads(config_file.read_text()).get("do_lower_case", True)
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                raise ValueError(f"{config_file} is not a JSON object") from None
            if lower is False:
                raise ValueError(
                    f"{config_file}: do_lower_case is false (a cased BERT); tpr lower-cases captions "
                    "and needs an uncased BERT vocabulary (e.g. bert-base-uncased)"
                )
        vocab: dict[str, int] = {}
        with vocab_file.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise ValueError(f"{vocab_file}: token {token!r} on lines {vocab[token] + 1} and {i + 1}")
                vocab[token] = i
        specials = [BERT_UNK_TOKEN, BERT_CLS_TOKEN, BERT_SEP_TOKEN, BERT_PAD_TOKEN, BERT_MASK_TOKEN]
        absent = [t for t in specials if t not in vocab]
        if absent:
            raise ValueError(
                f"{vocab_file}: no {', '.join(absent)} token; is it a BERT WordPiece vocabulary?"
            )
        backend = _Backend(models.WordPiece(vocab, unk_token=BERT_UNK_TOKEN, max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        # Already in the vocabulary: registering them keeps their ids (nothing is appended) and
        # makes "[MASK]" in a text one token, and skipped when decoding.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(
            backend,
            kind="bert",
            bos_token=BERT_CLS_TOKEN,
            eos_token=BERT_SEP_TOKEN,
            pad_token=BERT_PAD_TOKEN,
            mask_token=BERT_MASK_TOKEN,
            max_length=max_length,
        )

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tpr_tokenizer.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(d / _BACKEND_FILE))
        meta = {
            "kind": self.kind,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
            "tokens": self.tokens,
            "ids": {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "mask": self.mask_id},
        }
        (d / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return d

    def save_for_transformers(self, directory: str | Path) -> Path:
        """:meth:`save`, plus what ``transformers.PreTrainedTokenizerFast.from_pretrained`` reads.

        ``tokenizer_config.json`` and ``special_tokens_map.json`` name the special tokens, and
        ``tokenizer.json`` gets a post-processor that wraps a text in BOS ... EOS, so
        ``hf(text)["input_ids"]`` equals the ids of :meth:`encode` up to EOS. Truncation there is
        ``transformers``' own (it may cut EOS); :meth:`encode` keeps EOS on a long caption.
        """
        from tokenizers import processors

        d = self.save(directory)
        backend = _Backend.from_str(self._backend.to_str())
        bos, eos = self.tokens["bos"], self.tokens["eos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=[(bos, self.bos_id), (eos, self.eos_id)]
        )
        backend.save(str(d / _BACKEND_FILE))
        special = {f"{role}_token": tok for role, tok in self.tokens.items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": self.max_length, **special}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`; checks the stored ids against the vocabulary."""
        d = Path(directory)
        meta_path, backend_path = d / _META_FILE, d / _BACKEND_FILE
        for p in (meta_path, backend_path):
            if not p.is_file():
                raise FileNotFoundError(f"tokenizer file missing: {p}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
        for key in ("kind", "max_length", "tokens", "ids"):
            if key not in meta:
                raise ValueError(f"{meta_path}: missing field {key!r}")
        tokens = meta["tokens"]
        tok = cls(
            _Backend.from_file(str(backend_path)),
            kind=meta["kind"],
            bos_token=tokens["bos"],
            eos_token=tokens["eos"],
            pad_token=tokens["pad"],
            mask_token=tokens["mask"],
            max_length=int(meta["max_length"]),
        )
        got = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "mask": tok.mask_id}
        for role, tid in meta["ids"].items():
            if got.get(role) != tid:
                raise ValueError(
                    f"{meta_path}: field ids.{role} = {tid} but {backend_path} maps "
                    f"{tokens.get(role)!r} to {got.get(role)}"
                )
        return tok

    # ------------------------------------------------------------------ use

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize captions to ``BOS tokens EOS pad...``.

        Args:
            texts: B captions.
            max_length: padded length L (default ``self.max_length``); a caption longer
                than ``L - 2`` tokens keeps its first ``L - 2`` and then EOS.

        Returns:
            ``ids`` long (B, L) and ``mask`` long (B, L), 1 on BOS..EOS and 0 on padding.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of captions, not one string")
        L = self.max_length if max_length is None else int(max_length)
        if L < 2:
            raise ValueError(f"max_length must be >= 2, got {L}")
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(texts), L), dtype=torch.long)  # (B, L)
        # One encode per caption rather than encode_batch: the batch call starts the
        # Rust thread pool, which DataLoader workers forked later would have to disable.
        for b, text in enumerate(texts):
            ids[b], mask[b] = self.wrap(self.tokenize(text), L)
        return ids, mask

    def wrap(self, body: Sequence[int], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``BOS body EOS pad...`` for token ids from :meth:`tokenize`, truncated keeping EOS.

        Returns:
            ``ids`` long (L,) and ``mask`` long (L,).
        """
        L = self.max_length if max_length is None else int(max_length)
        n = min(len(body), L - 2)
        ids = torch.full((L,), self.pad_id, dtype=torch.long)
        ids[0] = self.bos_id
        ids[1 : n + 1] = torch.as_tensor(body[:n], dtype=torch.long)
        ids[n + 1] = self.eos_id
        mask = torch.zeros((L,), dtype=torch.long)
        mask[: n + 2] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence: stops at EOS, drops special tokens and padding."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (L,), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out: list[int] = []
        for i, t in enumerate(ids):
            if t == self.eos_id and i > 0:
                break
            if t not in self.special_ids:
                out.append(int(t))
        text = self._backend.decode(out, skip_special_tokens=True)
        # CLIP's BPE marks word ends with "</w>", which its ByteLevel decoder keeps.
        suffix = getattr(self._backend.model, "end_of_word_suffix", None)
        if suffix:
            text = " ".join(text.replace(suffix, " ").split())
        return text.strip()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, mask={self.mask_id})"
        )
