"""The prepared dataset on disk: Parquet schema, manifest, path resolution, readers.

A prepared dataset is a folder of Parquet shards (one row per (image, caption), columns
:data:`SCHEMA`) and a manifest, ``_manifest.json``, that lists the shards and carries
:data:`MANIFEST_VERSION`. ``tpr data prepare`` (:mod:`tpr_core.data.prepare`) writes it; every
reader opens it through :func:`open_prepared`, which always checks the version.

The manifest is named ``_manifest.json``, not ``manifest.json``: ``pyarrow.dataset.dataset(out)``
fails on any non-Parquet file in the folder unless its name starts with ``_`` or ``.``, and the
plain call must work on the output folder.

The same code reads local folders, NFS mounts and object stores: :func:`resolve` sends a URI
(``s3://bucket/tpr/cuhk``, ``gs://...``, ``file:///...``; see :func:`is_uri`) through
``pyarrow.fs.FileSystem.from_uri``, and anything else to the local file system.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
# Fields every reader relies on; the writer adds more (tool, schema, val_split, skipped, ...).
MANIFEST_FIELDS = ("shards", "counts", "content_hash", "source_format")

SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("pid", pa.int64(), nullable=False),
        pa.field("orig_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
    ]
)

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class DataFormatError(ValueError):
    """Data on disk (a raw dataset, a prepare request, or a prepared dataset) not in the expected
    format; the message names the file, record and field."""


class DatasetError(DataFormatError):
    """A prepared dataset that cannot be read; the message names the path, record and field."""


class DatasetNotPreparedError(DatasetError, FileNotFoundError):
    """The root holds no prepared dataset (no folder, no manifest, or a shard it lists is missing)."""


# ------------------------------------------------------------------------------ paths


def is_uri(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return bool(_URI.match(os.fspath(path)))


def resolve(path: str | os.PathLike[str], *, mmap: bool = False) -> tuple[pafs.FileSystem, str]:
    """The file system holding ``path`` and the path on it.

    Args:
        path: A local path (made absolute) or an fs URI (trailing ``/`` dropped).
        mmap: Local files are opened as memory maps (no effect on URIs).

    Raises:
        ValueError: a URI whose scheme pyarrow cannot open; the message names the URI.
    """
    text = os.fspath(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(use_mmap=mmap), os.path.abspath(text)
    try:
        fs, fs_path = pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid as e:
        raise ValueError(f"cannot open {text!r}: {e}") from None
    return fs, fs_path.rstrip("/")


# ------------------------------------------------------------------------------ manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as ``folder/_manifest.json`` (local folder, the writer's staging area)."""
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def _parse_manifest(data: bytes, mpath: str) -> dict[str, Any]:
    """The manifest in ``data``, checked: a JSON object of this version with the reader's fields."""
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{mpath}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{mpath}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{mpath}: the manifest must be a JSON object")
    got = manifest.get("manifest_version")
    if got != MANIFEST_VERSION:
        raise DatasetError(
            f"{mpath}: manifest_version {got!r} is not {MANIFEST_VERSION}; prepare the data again"
        )
    for key in MANIFEST_FIELDS:
        if key not in manifest:
            raise DatasetError(f"{mpath}: field {key!r}: missing field")
    if not isinstance(manifest["shards"], list):
        raise DatasetError(f"{mpath}: field 'shards': expected a list")
    for k, shard in enumerate(manifest["shards"]):
        for key in ("file", "split"):
            if not isinstance(shard, dict) or key not in shard:
                raise DatasetError(f"{mpath}: shards[{k}]: missing field {key!r}")
    return manifest


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset's root, opened: where it lives and its checked manifest.

    Attributes:
        root: The root as given (local path or URI), for messages.
        fs, path: The file system and the root's path on it.
        manifest: The manifest (version checked, reader fields present).
        manifest_path: The manifest's path on ``fs``.
    """

    root: str
    fs: pafs.FileSystem
    path: str
    manifest: dict[str, Any]
    manifest_path: str

    def shard_files(self, split: str | None = None) -> list[str]:
        """Paths on ``fs`` of the shards of ``split`` (all if None), in manifest order.

        Raises:
            DatasetNotPreparedError: a listed shard is missing; the message names it.
        """
        shards = self.manifest["shards"]
        files = [f"{self.path}/{s['file']}" for s in shards if split is None or s["split"] == split]
        for f, info in zip(files, self.fs.get_file_info(files), strict=True):
            if info.type != pafs.FileType.File:
                raise DatasetNotPreparedError(
                    f"prepared dataset at {self.root} is incomplete: "
                    f"missing {f} (listed in {self.manifest_path})"
                )
        return files


def open_prepared(root: str | os.PathLike[str], *, mmap: bool = False) -> PreparedDataset:
    """Open a prepared dataset: resolve its root and read its manifest.

    Args:
        root: Folder written by ``tpr data prepare`` (local path or fs URI).
        mmap: Open local shards as memory maps.

    Raises:
        DatasetNotPreparedError: no such folder, or no manifest in it.
        DatasetError: a manifest that is not JSON, of another ``manifest_version``, or without a
            field the readers need; the message names the manifest file.
    """
    text = os.fspath(root)
    fs, path = resolve(root, mmap=mmap)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise DatasetNotPreparedError(f"prepared dataset folder not found: {text} (run `tpr data prepare`)")
    mpath = f"{path}/{MANIFEST_NAME}"
    try:
        with fs.open_input_stream(mpath) as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetNotPreparedError(
            f"no prepared dataset at {text}: {MANIFEST_NAME} not found (run `tpr data prepare`)"
        ) from None
    return PreparedDataset(text, fs, path, _parse_manifest(data, mpath), mpath)


# ------------------------------------------------------------------------------ readers


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared dataset (counts, content hash, shards, ...); see :func:`open_prepared`."""
    return open_prepared(root).manifest


def open_dataset(root: str | os.PathLike[str]) -> ds.Dataset:
    """All shards of a prepared dataset as one ``pyarrow.dataset.Dataset``, in written order.

    The shard list comes from the manifest, so stray files in the folder are never read.
    """
    prepared = open_prepared(root)
    return ds.dataset(prepared.shard_files(), schema=SCHEMA, format="parquet", filesystem=prepared.fs)


def load_split_table(root: str | os.PathLike[str], split: str, columns: list[str] | None = None) -> pa.Table:
    """One split's rows, in the order written (pid, image path, caption index).

    Args:
        root: Folder written by ``tpr data prepare`` (local path or fs URI).
        split: ``train``, ``val`` or ``test``.
        columns: Columns to read (default all); leave out ``image`` for a light index.

    Returns:
        A table with the split's rows; empty (with the schema) if the split has none.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    unknown = sorted(set(columns or ()) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; the prepared schema has {SCHEMA.names}")
    prepared = open_prepared(root)
    files = prepared.shard_files(split)
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    # Shards never mix splits (prepare starts a new one at each split), so whole files are
    # read in manifest order, which keeps the written row order without a sort.
    tables = [pq.read_table(f, columns=columns, filesystem=prepared.fs, schema=SCHEMA) for f in files]
    return pa.concat_tables(tables)
