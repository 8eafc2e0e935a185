"""Raw TPR datasets (the source formats of :mod:`tpr_core.data.formats`) -> validated Parquet
shards + manifest.

``prepare`` reads a dataset as it is distributed, checks every record (fields, types, splits,
and that every image decodes completely), and writes one Parquet row per (image, caption):

    split  pid  orig_id  image_id  image_path  caption  caption_index  image

Rows are sorted by split (train, val, test), pid, image path, caption index; ``pid`` is
contiguous from 0 within each split in order of the source id; ``image_id`` is contiguous
from 0 over the whole output in that same order; ``image`` holds the source file's bytes,
untouched. A shard never mixes splits, so a reader can fetch one split's files only. The
schema, the manifest's name and version, and the readers are in :mod:`tpr_core.data.store`.

The output appears atomically: everything is written to ``OUT.tmp-<pid>`` next to ``OUT`` and
renamed at the end; on any error the temporary folder is removed and ``OUT`` never appears.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, UnidentifiedImageError

from tpr_core import __version__
from tpr_core.data.formats import FORMATS, FormatSpec
from tpr_core.data.store import MANIFEST_VERSION, SCHEMA, SPLITS, DataFormatError, write_manifest
from tpr_core.data.text import is_blank
from tpr_core.progress import Progress, track

MAX_REPORTED_ERRORS = 20
# Largest image accepted by default: pedestrian crops are a few hundred pixels a side; a
# 2048 x 2048 image decodes to 12 MB, a 12,500 x 12,000 one (a 146 kB PNG can be) to 450 MB.
DEFAULT_MAX_PIXELS = 2048 * 2048

# Image decode checks dominate the cost of a prepare; Pillow releases the GIL while decoding.
_CHECK_THREADS = max(2, min(4, os.cpu_count() or 2))


@dataclass
class _Problem:
    index: int | None
    path: str | None
    field: str
    reason: str

    def describe(self) -> str:
        where = f"record {self.index}" if self.index is not None else "file"
        path = f"path {self.path!r}" if self.path is not None else "path unknown"
        return f"{where} ({path}): field {self.field!r}: {self.reason}"


@dataclass
class _Record:
    index: int
    orig_id: int
    split: str
    path: str
    captions: list[str]


@dataclass
class _ImageEntry:
    split: str
    orig_id: int
    path: str
    captions: list[str]
    digest: str  # sha256 of the file bytes, taken when the image was checked
    records: list[int] = field(default_factory=list)


def prepare(
    fmt: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_rows: int = 2048,
    skip_bad: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Validate a raw dataset and write it as Parquet shards plus ``_manifest.json``.

    Args:
        fmt: Source format, a name in :data:`tpr_core.data.formats.FORMATS`.
        root: Dataset folder as distributed (annotation JSON + ``imgs/``).
        out: Output folder; must not exist (or be empty) unless ``overwrite``.
        shard_rows: Most rows per Parquet shard (one row group per shard).
        skip_bad: Skip bad records and list them in the manifest instead of failing.
        val_fraction: Formats without a val split (ICFG-PEDES): share of train identities
            held out as the val split.
        seed: Formats without a val split: seed of the val identity draw.
        overwrite: Replace an existing non-empty ``out``.
        max_pixels: Largest image (width x height) accepted; a larger one is a bad record,
            refused from its header before any pixel is decoded.

    Returns:
        The manifest, as written to ``out/_manifest.json``.

    Raises:
        DataFormatError: on bad input; the message names the file, each bad record's index
            and image path, and the field. Nothing is written then.
    """
    spec = _check_request(fmt, shard_rows, val_fraction)
    root, out = Path(root), Path(out)
    _check_out(out, overwrite)

    ann = _find_annotation(spec, root)
    raw = _load_json(ann)
    problems, records = _validate(spec, root, raw, max_pixels)
    if problems and not skip_bad:
        raise DataFormatError(_problems_message(ann, problems))
    if not records:
        raise DataFormatError(f"{ann}: no valid records left ({len(raw)} in the file, all bad)")

    images, repeated = _merge_images(records)
    val_split = _derive_val_split(images, val_fraction, seed) if spec.derives_val else {"derived_from": None}
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "tool": "tpr",
        "tool_version": __version__,
        "source_format": spec.name,
        "source_file": ann.name,
        "source_records": len(raw),
        "splits": list(SPLITS),
        "val_split": val_split,
        "shard_rows": shard_rows,
        "schema": [{"name": f.name, "type": str(f.type)} for f in SCHEMA],
        "skipped": [_skipped_entry(ps) for ps in _group_by_record(problems)],
        "duplicate_records": {"count": len(repeated), "records": repeated[:MAX_REPORTED_ERRORS]},
    }

    def fill(tmp: Path) -> None:
        manifest.update(_write_shards(root / spec.image_dir, images, tmp, shard_rows))
        write_manifest(tmp, manifest)

    _write_atomically(out, overwrite, fill)
    return manifest


def _check_request(fmt: str, shard_rows: int, val_fraction: float) -> FormatSpec:
    """The spec of ``fmt``, once the request's arguments are checked."""
    spec = FORMATS.get(fmt)
    if spec is None:
        raise DataFormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise DataFormatError(f"shard_rows must be a positive int, got {shard_rows!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataFormatError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return spec


# --------------------------------------------------------------------------- input


def _find_annotation(spec: FormatSpec, root: Path) -> Path:
    if not root.is_dir():
        raise DataFormatError(f"dataset root {root} is not a folder (format {spec.name})")
    for name in spec.annotation_files:
        p = root / name
        if p.is_file():
            return p
    expected = " or ".join(str(root / n) for n in spec.annotation_files)
    raise DataFormatError(f"annotation file not found: expected {expected} (format {spec.name})")


def _load_json(ann: Path) -> list[Any]:
    try:
        data = json.loads(ann.read_bytes())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{ann}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{ann}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataFormatError(f"{ann}: cannot read annotation file: {e.strerror or e}") from None
    except RecursionError:
        raise DataFormatError(f"{ann}: JSON nested too deeply to be a list of records") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{ann}: expected a JSON list of records at the top level, got {_tname(data)}")
    return data


def _tname(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def _parse_record(
    spec: FormatSpec, index: int, rec: Any
) -> tuple[_Record | None, str | None, list[_Problem]]:
    """Check one record's fields; returns (record or None, image path if valid, problems)."""
    if not isinstance(rec, dict):
        return (
            None,
            None,
            [_Problem(index, None, "<record>", f"wrong type: expected an object, got {_tname(rec)}")],
        )
    problems: list[_Problem] = []

    path: str | None = None
    pf = spec.path_field
    if pf not in rec:
        problems.append(_Problem(index, None, pf, "missing field"))
    elif not isinstance(rec[pf], str):
        problems.append(_Problem(index, None, pf, f"wrong type: expected string, got {_tname(rec[pf])}"))
    else:
        p = PurePosixPath(rec[pf])
        if not rec[pf].strip():
            problems.append(_Problem(index, rec[pf], pf, "empty image path"))
        elif "\x00" in rec[pf]:
            problems.append(_Problem(index, rec[pf], pf, "image path contains a NUL character"))
        elif p.is_absolute() or ".." in p.parts or "\\" in rec[pf]:
            problems.append(
                _Problem(
                    index, rec[pf], pf, f"image path must be relative to {spec.image_dir}/ (posix, no '..')"
                )
            )
        else:
            # "./p0/0.jpg" and "p0//0.jpg" name the file "p0/0.jpg" names: compare and store one form.
            path = posixpath.normpath(rec[pf])

    def bad(fname: str, reason: str) -> None:
        problems.append(_Problem(index, path if path is not None else _maybe_str(rec.get(pf)), fname, reason))

    orig_id = rec.get("id")
    if "id" not in rec:
        bad("id", "missing field")
    elif isinstance(orig_id, bool) or not isinstance(orig_id, int):
        bad("id", f"wrong type: expected int, got {_tname(orig_id)}")
    elif not -(2**63) <= orig_id < 2**63:
        bad("id", f"out of range: {orig_id} does not fit in int64")

    split = rec.get("split")
    if "split" not in rec:
        bad("split", "missing field")
    elif not isinstance(split, str):
        bad("split", f"wrong type: expected string, got {_tname(split)}")
    elif split not in spec.splits:
        bad("split", f"unknown split {split!r}; expected one of {', '.join(spec.splits)}")

    caps = rec.get("captions")
    captions: list[str] = []
    if "captions" not in rec:
        bad("captions", "missing field")
    elif not isinstance(caps, list):
        bad("captions", f"wrong type: expected a list of strings, got {_tname(caps)}")
    elif not caps:
        bad("captions", "empty caption list")
    else:
        for j, c in enumerate(caps):
            if not isinstance(c, str):
                bad(f"captions[{j}]", f"wrong type: expected string, got {_tname(c)}")
            elif is_blank(c):
                bad(f"captions[{j}]", "empty caption (no visible characters)")
            else:
                # The distributed files carry trailing spaces and newlines on some captions.
                captions.append(c.strip())

    if problems:
        return None, path, problems
    return _Record(index, orig_id, split, path, captions), path, []


def _maybe_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _check_image(file: Path, max_pixels: int, root: Path) -> tuple[str | None, str | None]:
    """Read and fully decode one image inside ``root`` (resolved) no larger than ``max_pixels``;
    returns (sha256 of its bytes, None) or (None, reason)."""
    real = file.resolve()
    if not real.is_relative_to(root):
        return None, f"image path leads outside the dataset folder {root} (a symlink to {real})"
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return None, f"image file not found: {file}"
    except IsADirectoryError:
        return None, f"image path is a folder, not a file: {file}"
    except OSError as e:
        return None, f"cannot read image file {file}: {e.strerror or e}"
    if not data:
        return None, f"empty image file: {file}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                return None, f"image of {w}x{h} pixels is over the limit of {max_pixels} (max_pixels): {file}"
            if im.format == "JPEG":
                # Decode at 1/8 scale: libjpeg still reads every entropy-coded byte (truncation
                # still raises) but skips most of the IDCT; about 1.6x faster than full size.
                im.draft(None, (1, 1))
            # verify() only parses headers; load() decodes every byte, so truncation shows.
            im.load()
    except UnidentifiedImageError:
        return None, f"not a recognised image format: {file}"
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None, f"truncated or corrupt image {file}: {e}"
    return hashlib.sha256(data).hexdigest(), None


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    # A process-wide flag some training code sets; a prepare must see truncation as an error.
    # Pillow's own bomb check is off: _check_image refuses large images from their header with
    # the caller's limit, before Pillow would decode them.
    old = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old


def _validate(
    spec: FormatSpec, root: Path, raw: list[Any], max_pixels: int
) -> tuple[list[_Problem], list[tuple[_Record, str]]]:
    """Check every record; returns (problems, [(good record, image digest)]) in record order."""
    problems: dict[int, list[_Problem]] = {}
    parsed: dict[int, _Record] = {}
    paths: dict[int, str] = {}
    for i, rec in enumerate(raw):
        r, path, ps = _parse_record(spec, i, rec)
        if ps:
            problems[i] = ps
        if r is not None:
            parsed[i] = r
        if path is not None:
            paths[i] = path

    # Check each distinct image once, also for records with other problems, so that a strict
    # run reports everything wrong at once.
    img_dir, real_root = root / spec.image_dir, root.resolve()
    unique = sorted(set(paths.values()))
    with _strict_pillow(), ThreadPoolExecutor(_CHECK_THREADS) as pool:
        checked = pool.map(lambda p: _check_image(img_dir / p, max_pixels, real_root), unique)
        results = dict(zip(unique, track(checked, "checking images", len(unique), "images"), strict=True))
    for i, path in paths.items():
        _, reason = results[path]
        if reason is not None:
            problems.setdefault(i, []).append(_Problem(i, path, spec.path_field, reason))
            parsed.pop(i, None)

    # One image is one image of one identity in one split: one file (by its normalised path),
    # and one content (the same bytes under two paths).
    _one_owner(parsed, problems, lambda r: r.path, "image")
    _one_owner(parsed, problems, lambda r: results[r.path][0], "an image with the same bytes")

    flat = [p for i in sorted(problems) for p in problems[i]]
    good = [(parsed[i], results[parsed[i].path][0]) for i in sorted(parsed)]
    return flat, good


def _one_owner(
    parsed: dict[int, _Record], problems: dict[int, list[_Problem]], key: Callable[[_Record], Any], what: str
) -> None:
    """Drop (as a problem) every record whose ``key`` an earlier record has with another id or
    split; ``what`` names the shared thing in the reason."""
    first: dict[Any, _Record] = {}
    for i in sorted(parsed):
        r = parsed[i]
        seen = first.setdefault(key(r), r)
        if seen is r:
            continue
        where = f"record {seen.index}" + (f", path {seen.path!r}" if seen.path != r.path else "")
        if seen.orig_id != r.orig_id:
            reason = f"{what} already belongs to id {seen.orig_id} ({where}); this record says {r.orig_id}"
            problems.setdefault(i, []).append(_Problem(i, r.path, "id", reason))
            del parsed[i]
        elif seen.split != r.split:
            reason = f"{what} already in split {seen.split!r} ({where}); this record says {r.split!r}"
            problems.setdefault(i, []).append(_Problem(i, r.path, "split", reason))
            del parsed[i]


def _problems_message(ann: Path, problems: list[_Problem]) -> str:
    n_rec = len({p.index for p in problems})
    lines = [f"{ann}: {n_rec} bad record(s), nothing written (skip_bad / --skip-bad skips them):"]
    lines += [f"  {p.describe()}" for p in problems[:MAX_REPORTED_ERRORS]]
    if len(problems) > MAX_REPORTED_ERRORS:
        lines.append(f"  ... and {len(problems) - MAX_REPORTED_ERRORS} more problem(s)")
    return "\n".join(lines)


def _group_by_record(problems: list[_Problem]) -> list[list[_Problem]]:
    groups: dict[int | None, list[_Problem]] = {}
    for p in problems:
        groups.setdefault(p.index, []).append(p)
    return list(groups.values())


def _skipped_entry(ps: list[_Problem]) -> dict[str, Any]:
    first = ps[0]
    path = next((p.path for p in ps if p.path is not None), None)
    entry: dict[str, Any] = {"index": first.index, "path": path, "field": first.field, "reason": first.reason}
    if len(ps) > 1:
        entry["errors"] = [{"field": p.field, "reason": p.reason} for p in ps]
    return entry


# --------------------------------------------------------------------------- layout


def _merge_images(records: list[tuple[_Record, str]]) -> tuple[list[_ImageEntry], list[int]]:
    """One entry per image file; repeated records of one image (same id, split) pool captions.
    A record repeating an earlier one exactly (same image, id, split and captions) is merged
    into it: returns the entries and the indices of those repeated records."""
    by_path: dict[str, _ImageEntry] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    repeated: list[int] = []
    for r, digest in records:
        if (r.path, tuple(r.captions)) in seen:
            repeated.append(r.index)
            continue
        seen.add((r.path, tuple(r.captions)))
        im = by_path.get(r.path)
        if im is None:
            by_path[r.path] = _ImageEntry(r.split, r.orig_id, r.path, list(r.captions), digest, [r.index])
        else:
            im.captions.extend(r.captions)
            im.records.append(r.index)
    return list(by_path.values()), repeated


def _derive_val_ids(images: list[_ImageEntry], fraction: float, seed: int) -> set[int]:
    """Train identities held out as val: ranked by a seeded hash, so the draw of one identity
    does not depend on which others are present, nor on the Python or numpy version."""
    train = {im.orig_id for im in images if im.split == "train"}
    test = {im.orig_id for im in images if im.split == "test"}
    candidates = sorted(train - test)  # an id also in test must not reach val
    if fraction <= 0 or len(candidates) < 2:
        return set()
    k = min(max(1, round(fraction * len(candidates))), len(candidates) - 1)
    ranked = sorted(candidates, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return set(ranked[:k])


def _derive_val_split(images: list[_ImageEntry], fraction: float, seed: int) -> dict[str, Any]:
    """Move the drawn train identities' images to val; returns the manifest's ``val_split``."""
    val_ids = _derive_val_ids(images, fraction, seed)
    for im in images:
        if im.split == "train" and im.orig_id in val_ids:
            im.split = "val"
    return {
        "derived_from": "train",
        "fraction": fraction,
        "seed": seed,
        "identities": len(val_ids),
        "method": "train identities not in test, ranked by sha256('<seed>:<id>'), first round(fraction*n)",
    }


def _ordered(images: list[_ImageEntry]) -> list[tuple[str, int, int, _ImageEntry]]:
    """(split, pid, image_id, image) in output order."""
    out: list[tuple[str, int, int, _ImageEntry]] = []
    image_id = 0
    for split in SPLITS:
        ims = [im for im in images if im.split == split]
        pid_of = {oid: pid for pid, oid in enumerate(sorted({im.orig_id for im in ims}))}
        for im in sorted(ims, key=lambda im: (pid_of[im.orig_id], im.path)):
            out.append((split, pid_of[im.orig_id], image_id, im))
            image_id += 1
    return out


def _hash_row(h: Any, split: str, pid: int, image_id: int, im: _ImageEntry, j: int) -> None:
    # Length-prefixed fields, image by its sha256: the hash is of the content, independent of
    # the Parquet encoding, pyarrow version and shard size.
    for s in (split, im.path, im.captions[j], im.digest):
        b = s.encode()
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    h.update(struct.pack("<qqqq", pid, im.orig_id, image_id, j))


def _write_shards(img_dir: Path, images: list[_ImageEntry], tmp: Path, shard_rows: int) -> dict[str, Any]:
    h = hashlib.sha256()
    shards: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    ordered = _ordered(images)
    progress = Progress("writing shards", sum(len(t[3].captions) for t in ordered), "rows")
    for split in SPLITS:
        part = [t for t in ordered if t[0] == split]
        counts[split] = {
            "identities": len({t[1] for t in part}),
            "images": len(part),
            "captions": sum(len(t[3].captions) for t in part),
        }
        rows = [(t, j) for t in part for j in range(len(t[3].captions))]
        for start in range(0, len(rows), shard_rows):
            chunk = rows[start : start + shard_rows]
            name = f"part-{len(shards):05d}.parquet"
            table = _shard_table(img_dir, chunk)
            pq.write_table(
                table,
                tmp / name,
                row_group_size=len(chunk),
                compression={c: ("none" if c == "image" else "snappy") for c in SCHEMA.names},
                use_dictionary=["split", "image_path"],
            )
            for (sp, pid, iid, im), j in chunk:
                _hash_row(h, sp, pid, iid, im, j)
            shards.append({"file": name, "split": split, "rows": len(chunk)})
            progress.advance(len(chunk))
    progress.close()
    counts["total"] = {k: sum(counts[s][k] for s in SPLITS) for k in ("identities", "images", "captions")}
    return {"counts": counts, "content_hash": f"sha256:{h.hexdigest()}", "shards": shards}


def _shard_table(img_dir: Path, chunk: Sequence[tuple[tuple[str, int, int, _ImageEntry], int]]) -> pa.Table:
    blobs: dict[str, bytes] = {}
    for (_, _, _, im), _ in chunk:
        if im.path not in blobs:
            data = (img_dir / im.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != im.digest:
                raise DataFormatError(f"image file changed while preparing: {img_dir / im.path}")
            blobs[im.path] = data
    cols = {
        "split": [t[0] for t, _ in chunk],
        "pid": [t[1] for t, _ in chunk],
        "orig_id": [t[3].orig_id for t, _ in chunk],
        "image_id": [t[2] for t, _ in chunk],
        "image_path": [t[3].path for t, _ in chunk],
        "caption": [t[3].captions[j] for t, j in chunk],
        "caption_index": [j for _, j in chunk],
        "image": [blobs[t[3].path] for t, _ in chunk],
    }
    return pa.Table.from_pydict(cols, schema=SCHEMA)


# --------------------------------------------------------------------------- output


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise DataFormatError(f"output path {out} exists and is not a folder")
        if any(out.iterdir()):
            raise DataFormatError(
                f"output folder {out} exists and is not empty; remove it or pass overwrite=True"
            )


def _write_atomically(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp)`` on a fresh ``OUT.tmp-<pid>`` next to ``out``, then move it to ``out``;
    a write that fails (no permission, a full disk) is a ``DataFormatError`` naming ``out``, with
    nothing left behind."""
    try:
        _fill_and_move(out, overwrite, fill)
    except DataFormatError:
        raise
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise DataFormatError(f"cannot write the prepared dataset to {out}{where}: {e.strerror or e}") from None


def _fill_and_move(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed run with the same pid
    try:
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            elif overwrite:
                os.replace(out, old)
            else:  # appeared while we were writing
                raise DataFormatError(f"output folder {out} appeared while preparing; not replacing it")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
