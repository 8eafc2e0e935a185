"""An embedding index: the images of a folder (or of a prepared dataset's split), or a split's
captions, embedded once by one model, ranked later for a text or an image query.

Layout (format version 1)::

    <index>/
        _index.json          {"format": "tpr-index", "format_version": 1, "kind": "image" | "caption",
                              "model": the model as named when indexing, "weights_sha256",
                              "method", "dim", "image_size": [H, W], "mean", "std",
                              "text_length", "source": folder or dataset root, "split" (a dataset's)
                              or null, "complete", "rows", "skipped": [{"path", "reason"}],
                              "created", "updated"}
        part-00000.parquet   one row per image (kind image) or caption (kind caption):
                             ``path`` string, ``embedding`` fixed_size_list<float32>[D]
                             (L2-normalised); from a prepared dataset also ``image_id`` int64 and
                             ``person`` int64 (the dataset's person id); captions also
                             ``caption_index`` int32 and ``caption`` string

Every part carries the model's weights hash in its schema metadata (``tpr.index``), so a part
left by another model is refused by name. Nothing in an index is code: reading one parses
JSON and Parquet only.

Writing is resumable. A part appears whole (written to a hidden temporary file, then
renamed), ``_index.json`` is written the same way before the first part and again at the end
(``complete``); a run that dies leaves whole parts and an incomplete index, and the next run
over the same source with the same model skips every row a part already holds. A run with
another model, or over another source, is refused, naming both. One writer at a time: the
writer holds an ``flock`` on ``_index.lock`` (released by the kernel however the process ends).

The model side is a :class:`~tpr_core.export.Exported` model: images go through the
evaluation transform (resize + CLIP normalisation, :class:`~tpr_core.data.transforms.ImageTransform`)
and ``encode_image``; captions through the model's tokenizer and ``encode_text``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from tpr_core.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, normalize_batch

FORMAT_NAME = "tpr-index"
FORMAT_VERSION = 1
META_FILE = "_index.json"
LOCK_FILE = "_index.lock"
PART_PREFIX = "part-"
SCHEMA_KEY = b"tpr.index"
KINDS = ("image", "caption")
# What torchvision's decoder reads (JPEG, PNG, WebP, GIF); other files in a folder are not images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})
DEFAULT_PART_ROWS = 1024
DEFAULT_MAX_PIXELS = 2048 * 2048  # as ``tpr data prepare``: pedestrian crops are far smaller


class ImageIndexError(ValueError):
    """An index that cannot be written or read, or an input it cannot take; the message names
    the file, row or field."""


class IndexModelMismatch(ImageIndexError):
    """An index made by another model than the one using it; the message names both."""


# ------------------------------------------------------------------------------ the model side


def weights_digest(exported: Any) -> str:
    """The SHA-256 of an exported model's weights file: the identity an index is tied to.

    ``load_exported`` has already checked the file against the recorded hash when there is one.
    """
    from tpr_core.export import WEIGHTS_FILE

    recorded = (exported.info or {}).get("weights_sha256")
    if recorded:
        return str(recorded)
    h = hashlib.sha256()
    with open(Path(exported.path) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _header_size(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image larger than ``max_pixels`` from its header, before anything decodes it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise ImageIndexError(f"not a recognised image format: {name}") from None
    except Exception as e:  # Pillow: OSError, SyntaxError, ValueError on a broken header
        raise ImageIndexError(f"unreadable image header in {name}: {e}") from None
    if w * h > max_pixels:
        raise ImageIndexError(f"image of {w}x{h} pixels is over the limit of {max_pixels} (max_pixels): {name}")


def decode_for_model(data: bytes, name: str, image_size: Sequence[int], max_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, H, W) through the evaluation transform; a bad image is an
    :class:`ImageIndexError` naming ``name``."""
    if not data:
        raise ImageIndexError(f"empty image file: {name}")
    _header_size(data, name, max_pixels)
    try:
        img, _ = ImageTransform(tuple(image_size), train=False).geometric(data)  # (3, H, W) uint8
    except RuntimeError as e:
        raise ImageIndexError(f"truncated or corrupt image {name}: {e}") from None
    return img


@torch.no_grad()
def embed_images(exported: Any, images: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalised image embeddings (B, D) of uint8 (3, H, W) images, on the CPU."""
    x = normalize_batch(images).to(_model_device(exported.model))  # (B, 3, H, W)
    return F.normalize(exported.model.encode_image(x).float(), dim=1).cpu()


@torch.no_grad()
def embed_texts(exported: Any, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings (B, D) of the model's tokenizer and text encoder, on the CPU."""
    length = exported.cfg.model.text_length
    ids, mask = exported.tokenizer.encode(texts, length)  # (B, L)
    dev = _model_device(exported.model)
    return F.normalize(exported.model.encode_text(ids.to(dev), mask.to(dev)).float(), dim=1).cpu()


def embed_image_file(exported: Any, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The (1, D) embedding of one image file (a query image)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageIndexError(f"cannot read image file {p}: {e.strerror or e}") from None
    return embed_images(exported, [decode_for_model(data, str(p), exported.cfg.model.image_size, max_pixels)])


# ------------------------------------------------------------------------------ sources


@dataclass
class _Item:
    """One row to embed: its key columns, and how to get its payload (image bytes or caption)."""

    path: str
    load: Callable[[], bytes | str]
    image_id: int | None = None
    person: int | None = None
    caption_index: int | None = None
    where: str = ""  # how messages name it (the file of a folder's image); default ``path``

    @property
    def key(self) -> tuple[str, int]:
        return self.path, -1 if self.caption_index is None else self.caption_index


@dataclass
class _Source:
    name: str  # the folder or dataset root, as recorded in _index.json
    split: str | None
    kind: str
    items: list[_Item]
    from_dataset: bool


def _is_prepared(source: str) -> bool:
    from tpr_core.data.store import MANIFEST_NAME, is_uri

    return is_uri(source) or (Path(source) / MANIFEST_NAME).is_file()


def _folder_items(root: Path, skip: Path) -> list[_Item]:
    """Every image file under ``root`` (sorted, hidden names and ``skip`` left out) as items
    keyed by their POSIX path relative to ``root``; a symlink out of ``root`` is refused."""
    real_root = root.resolve()
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            file = here / name
            if not file.is_file():  # a FIFO or device named like an image: reading it could block
                continue
            rel = PurePosixPath(*file.relative_to(root).parts).as_posix()
            items.append(_Item(rel, functools.partial(_read_inside, file, real_root), where=str(file)))
    return items


def _read_inside(file: Path, root: Path) -> bytes:
    real = file.resolve()
    if not real.is_relative_to(root):
        raise ImageIndexError(f"image path leads outside the folder {root} (a symlink to {real}): {file}")
    try:
        return file.read_bytes()
    except OSError as e:
        raise ImageIndexError(f"cannot read image file {file}: {e.strerror or e}") from None


def _dataset_items(root: str, split: str, captions: bool) -> list[_Item]:
    from tpr_core.data.dataset import load_split
    from tpr_core.data.store import load_split_table

    if captions:
        t = load_split_table(root, split, columns=["image_path", "image_id", "orig_id", "caption", "caption_index"])
        rows = zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)
        return [_Item(p, (lambda c=c: c), int(i), int(o), int(ci)) for p, i, o, c, ci in rows]
    data = load_split(root, split)
    table = load_split_table(root, split, columns=["image_id", "orig_id"])
    person = dict(zip(table.column("image_id").to_pylist(), table.column("orig_id").to_pylist(), strict=True))
    first_row = np.searchsorted(data.image_rows, np.arange(data.num_images))
    return [
        _Item(data.image_path(int(first_row[u])), (lambda u=u: data.image_bytes(u)),
              int(data.unique_image_ids[u]), int(person[int(data.unique_image_ids[u])]))  # fmt: skip
        for u in range(data.num_images)
    ]


def _open_source(source: str, split: str, captions: bool, out: Path) -> _Source:
    if _is_prepared(source):
        kind = "caption" if captions else "image"
        return _Source(str(source), split, kind, _dataset_items(source, split, captions), True)
    root = Path(source)
    if not root.is_dir():
        raise ImageIndexError(f"images folder not found: {source} (give a folder of images or a prepared dataset)")
    if captions:
        raise ImageIndexError(
            f"--captions needs a prepared dataset (tpr data prepare); {source} is a folder of images without captions"
        )
    return _Source(str(root.resolve()), None, "image", _folder_items(root, out.resolve()), False)


# ------------------------------------------------------------------------------ writing


@dataclass
class IndexSummary:
    """What one ``build_index`` run did.

    Attributes:
        out: the index folder.
        added: rows embedded and written by this run.
        already: rows a previous run had written (skipped).
        skipped: bad images left out (``skip_bad``), as {"path", "reason"}.
        rows: rows in the index now.
        meta: the final ``_index.json``.
    """

    out: Path
    added: int
    already: int
    skipped: list[dict[str, str]]
    rows: int
    meta: dict[str, Any] = field(default_factory=dict)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    meta["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write_atomic(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ImageIndexError(f"index {out} is being written by {holder}; wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _part_files(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(".parquet")
    )  # fmt: skip


def _part_digest(schema: pa.Schema, part: str) -> str:
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    try:
        return str(json.loads(raw)["weights_sha256"])
    except (TypeError, ValueError, KeyError):
        raise ImageIndexError(f"{part}: not a tpr index part (schema metadata {SCHEMA_KEY.decode()!r} missing)") from None


def _done_keys(out: Path, digest: str) -> tuple[set[tuple[str, int]], int]:
    """Keys of the rows the parts already hold, and the next part number."""
    fs = pafs.LocalFileSystem()
    done: set[tuple[str, int]] = set()
    last = -1
    for part in _part_files(fs, str(out)):
        pf = pq.ParquetFile(part)
        if _part_digest(pf.schema_arrow, part) != digest:
            raise IndexModelMismatch(f"{part} was written by another model than the index's (weights {digest[:12]})")
        cols = ["path", "caption_index"] if "caption_index" in pf.schema_arrow.names else ["path"]
        t = pf.read(columns=cols)
        idx = t.column("caption_index").to_pylist() if len(cols) == 2 else [-1] * t.num_rows
        done.update(zip(t.column("path").to_pylist(), idx, strict=True))
        stem = Path(part).stem.removeprefix(PART_PREFIX)
        last = max(last, int(stem)) if stem.isdigit() else last
    return done, last + 1


def _remove_leftovers(out: Path) -> None:
    """Temporary files of a run that died (never visible as parts)."""
    for p in out.iterdir():
        if p.name.startswith(f".{PART_PREFIX}") or p.name.startswith(f".{META_FILE}.tmp-"):
            p.unlink(missing_ok=True)


def _new_meta(exported: Any, model_name: str, digest: str, src: _Source, dim: int) -> dict[str, Any]:
    cfg = exported.cfg
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": src.kind,
        "model": model_name,
        "weights_sha256": digest,
        "method": cfg.method,
        "dim": int(dim),
        "image_size": [int(s) for s in cfg.model.image_size],
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "text_length": int(cfg.model.text_length),
        "source": src.name,
        "split": src.split,
        "complete": False,
        "rows": 0,
        "skipped": [],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def check_same_model(meta: dict[str, Any], where: str, model_name: str, digest: str) -> None:
    """Refuse an index (``meta`` from ``where``) made by another model than ``model_name``."""
    if meta.get("weights_sha256") != digest:
        raise IndexModelMismatch(
            f"index {where} was made by model {meta.get('model')!r} (weights sha256 "
            f"{str(meta.get('weights_sha256'))[:12]}), not by {model_name!r} (weights sha256 {digest[:12]}); "
            f"index the images again with --model {model_name}"
        )


def _check_resume(meta: dict[str, Any], out: Path, model_name: str, digest: str, src: _Source) -> None:
    _check_format(meta, str(out / META_FILE))
    check_same_model(meta, str(out), model_name, digest)
    if (meta.get("source"), meta.get("split"), meta.get("kind")) != (src.name, src.split, src.kind):
        raise ImageIndexError(
            f"index {out} holds {meta.get('kind')}s of {meta.get('source')!r}"
            + (f" split {meta.get('split')!r}" if meta.get("split") else "")
            + f", not {src.kind}s of {src.name!r}" + (f" split {src.split!r}" if src.split else "")
            + "; give another --out"
        )


def _part_table(batch: list[_Item], emb: torch.Tensor, src: _Source, digest: str) -> pa.Table:
    dim = emb.shape[1]
    cols: dict[str, pa.Array] = {"path": pa.array([it.path for it in batch], pa.string())}
    if src.from_dataset:
        cols["image_id"] = pa.array([it.image_id for it in batch], pa.int64())
        cols["person"] = pa.array([it.person for it in batch], pa.int64())
    if src.kind == "caption":
        cols["caption_index"] = pa.array([it.caption_index for it in batch], pa.int32())
        cols["caption"] = pa.array([it.load() for it in batch], pa.string())
    flat = pa.array(emb.numpy().astype(np.float32).reshape(-1), pa.float32())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    meta = json.dumps({"weights_sha256": digest, "kind": src.kind}).encode()
    return pa.table(cols).replace_schema_metadata({SCHEMA_KEY: meta})


def _embed_batch(
    exported: Any, batch: list[_Item], kind: str, max_pixels: int, skip_bad: bool, skipped: list[dict[str, str]]
) -> tuple[list[_Item], torch.Tensor | None]:
    """Embed one batch; bad images are refused (or, with ``skip_bad``, dropped and listed)."""
    if kind == "caption":
        return batch, embed_texts(exported, [str(it.load()) for it in batch])
    good, images = [], []
    for it in batch:
        try:
            data = bytes(it.load())
            images.append(decode_for_model(data, it.where or it.path, exported.cfg.model.image_size, max_pixels))
            good.append(it)
        except ImageIndexError as e:
            if not skip_bad:
                raise
            skipped.append({"path": it.path, "reason": str(e)})
    return good, (embed_images(exported, images) if images else None)


def build_index(
    exported: Any,
    model_name: str,
    source: str,
    out: str | Path,
    *,
    split: str = "test",
    captions: bool = False,
    batch_size: int | None = None,
    part_rows: int = DEFAULT_PART_ROWS,
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
) -> IndexSummary:
    """Embed every image of ``source`` (or every caption, ``captions``) into the index ``out``,
    or finish an index a previous run began.

    Args:
        exported: a loaded model (``tpr_core.export.load_exported``).
        model_name: how the model was named (a registry URI or a folder), recorded and used in messages.
        source: a folder of images (searched recursively) or a prepared dataset (local path or URI).
        out: the index folder (local).
        split: the prepared dataset's split (ignored for a folder).
        captions: index the split's captions instead of its images (prepared datasets only).
        batch_size: rows per forward pass (default the model's ``data.eval_batch_size``).
        part_rows: rows per Parquet part: what a crash can cost at most.
        skip_bad: leave out unreadable images (listed in ``_index.json``) instead of stopping.
        max_pixels: largest image (width x height), read from its header before decoding.
        progress: called with (rows done by this run, rows this run has to do) after each part.

    Raises:
        ImageIndexError: a bad image (without ``skip_bad``), a source that is neither a folder
            nor a prepared dataset, an index of another source; :class:`IndexModelMismatch`
            for an index of another model.
    """
    if part_rows < 1:
        raise ImageIndexError(f"part_rows must be >= 1, got {part_rows}")
    out = Path(out)
    digest = weights_digest(exported)
    src = _open_source(str(source), split, captions, out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _writer_lock(out):
            return _build_locked(exported, model_name, digest, src, out, batch_size, part_rows, skip_bad,
                                 max_pixels, progress)  # fmt: skip
    except BaseException:
        if created and not any(p.name != LOCK_FILE for p in out.iterdir()):
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()  # nothing was written: leave no empty index behind
        raise


def _build_locked(
    exported: Any,
    model_name: str,
    digest: str,
    src: _Source,
    out: Path,
    batch_size: int | None,
    part_rows: int,
    skip_bad: bool,
    max_pixels: int,
    progress: Callable[[int, int], None] | None,
) -> IndexSummary:
    meta_path = out / META_FILE
    meta = _read_json(meta_path) if meta_path.is_file() else None
    if meta is not None:
        _check_resume(meta, out, model_name, digest, src)
    elif any(p.name.startswith(PART_PREFIX) for p in out.iterdir()):
        raise ImageIndexError(f"{out} holds index parts but no {META_FILE}; give an empty or new --out")
    _remove_leftovers(out)
    done, next_part = _done_keys(out, digest)
    todo = [it for it in _unique(src.items) if it.key not in done]
    bs = int(batch_size or exported.cfg.data.eval_batch_size)
    skipped: list[dict[str, str]] = []
    added = 0
    for start in range(0, len(todo), part_rows):
        group = todo[start : start + part_rows]
        kept, feats = [], []
        for b in range(0, len(group), bs):
            good, emb = _embed_batch(exported, group[b : b + bs], src.kind, max_pixels, skip_bad, skipped)
            if emb is not None:
                kept += good
                feats.append(emb)
        if kept:
            emb = torch.cat(feats)  # (P, D)
            if meta is None:
                meta = _new_meta(exported, model_name, digest, src, emb.shape[1])
                _write_meta(out, meta)  # before the first part: every part has its model on record
            table = _part_table(kept, emb, src, digest)
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            _write_atomic(out / f"{PART_PREFIX}{next_part:05d}.parquet", buf.getvalue().to_pybytes())
            next_part += 1
            added += len(kept)
        if progress is not None:
            progress(start + len(group), len(todo))
    if meta is None:
        if not done:
            raise ImageIndexError(f"no images to index in {src.name}" + (" (every one was bad)" if skipped else ""))
        meta = _read_json(meta_path)
    meta.update(complete=True, rows=len(done) + added, skipped=skipped)
    _write_meta(out, meta)
    return IndexSummary(out, added, len(done), skipped, len(done) + added, meta)


def _unique(items: list[_Item]) -> list[_Item]:
    seen: set[tuple[str, int]] = set()
    out = []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            out.append(it)
    return out


# ------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImageIndexError(f"{path}: not readable as JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ImageIndexError(f"{path}: expected a JSON object")
    return meta


def _check_format(meta: dict[str, Any], where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ImageIndexError(f"{where}: field 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ImageIndexError(
            f"{where}: field 'format_version' is {meta.get('format_version')!r}; this tpr reads {FORMAT_VERSION}"
        )
    if meta.get("kind") not in KINDS:
        raise ImageIndexError(f"{where}: field 'kind' is {meta.get('kind')!r}, expected one of {KINDS}")


@dataclass
class ImageIndex:
    """An index read into memory.

    Attributes:
        where: the index as named (local path or URI).
        meta: its ``_index.json``.
        embeddings: float32 (N, D), L2-normalised.
        paths: (N,) object array of row paths.
        image_ids, persons: int64 (N,), or None (an index of a plain folder).
        captions: (N,) object array of captions, or None (an index of images).
    """

    where: str
    meta: dict[str, Any]
    embeddings: torch.Tensor
    paths: np.ndarray
    image_ids: np.ndarray | None
    persons: np.ndarray | None
    captions: np.ndarray | None

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def read_index_meta(where: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``_index.json`` of an index (local path or fs URI), format checked."""
    from tpr_core.data.store import resolve

    fs, path = resolve(where)
    mpath = f"{path}/{META_FILE}"
    try:
        with fs.open_input_stream(mpath) as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise ImageIndexError(f"no index at {os.fspath(where)}: {META_FILE} not found (run tpr index)") from None
    except ValueError as e:
        raise ImageIndexError(f"{mpath}: not readable as JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ImageIndexError(f"{mpath}: expected a JSON object")
    _check_format(meta, mpath)
    return meta


def load_index(where: str | os.PathLike[str]) -> ImageIndex:
    """Read a complete index (local path or fs URI); every part must be its model's.

    Raises:
        ImageIndexError: no index there, an incomplete one (a run still going or one that
            died: ``tpr index`` again finishes it), or a part that does not fit.
    """
    from tpr_core.data.store import resolve

    name = os.fspath(where)
    meta = read_index_meta(where)
    if not meta.get("complete"):
        raise ImageIndexError(f"index {name} is incomplete (a tpr index run is going on or died: run it again)")
    fs, path = resolve(where)
    tables = []
    for part in _part_files(fs, path):
        t = pq.read_table(part, filesystem=fs)
        if _part_digest(t.schema, part) != meta.get("weights_sha256"):
            raise IndexModelMismatch(f"{part} was written by another model than {name}'s (model {meta.get('model')!r})")
        if "embedding" not in t.column_names or "path" not in t.column_names:
            raise ImageIndexError(f"{part}: columns 'path' and 'embedding' are required, got {t.column_names}")
        tables.append(t)
    if not tables:
        raise ImageIndexError(f"index {name} has no rows")
    table = pa.concat_tables(tables, promote_options="none")
    emb = table.column("embedding").combine_chunks()
    dim = getattr(emb.type, "list_size", None)
    if dim != meta.get("dim") or emb.null_count:
        raise ImageIndexError(f"index {name}: field 'embedding' is {emb.type}, expected {meta.get('dim')} float32s per row")
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)

    def col(n: str, dtype: Any = None) -> np.ndarray | None:
        if n not in table.column_names:
            return None
        return np.asarray(table.column(n).to_pylist(), dtype=dtype or object)

    return ImageIndex(
        where=name,
        meta=meta,
        embeddings=torch.from_numpy(flat.reshape(table.num_rows, dim).copy()),  # (N, D)
        paths=col("path"),
        image_ids=col("image_id", np.int64),
        persons=col("person", np.int64),
        captions=col("caption"),
    )


# ------------------------------------------------------------------------------ ranking


def top_k(queries: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine ranking of ``rows`` (N, D) for L2-normalised ``queries`` (Q, D): (order, scores),
    both (Q, min(k, N)), best first; equal scores keep row order (as ``tpr_core.eval.metrics``)."""
    scores = queries @ rows.t()  # (Q, N)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, : min(k, rows.shape[0])]  # (Q, k)
    return order, torch.gather(scores, 1, order)


def search_index(index: ImageIndex, queries: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
    """The top ``k`` rows of ``index`` for each query embedding, as dicts with ``path``,
    ``score`` and, where the index has them, ``image_id``, ``person`` and ``caption``."""
    if k < 1:
        raise ImageIndexError(f"top_k must be >= 1, got {k}")
    order, scores = top_k(queries, index.embeddings, k)
    out = []
    for q in range(order.shape[0]):
        hits = []
        for j, s in zip(order[q].tolist(), scores[q].tolist(), strict=True):
            hit: dict[str, Any] = {"path": str(index.paths[j]), "score": float(s)}
            if index.image_ids is not None:
                hit["image_id"] = int(index.image_ids[j])
            if index.persons is not None:
                hit["person"] = int(index.persons[j])
            if index.captions is not None:
                hit["caption"] = str(index.captions[j])
            hits.append(hit)
        out.append(hits)
    return out
