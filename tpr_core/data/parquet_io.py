"""Read a prepared dataset (Parquet shards + ``_manifest.json``) from a local path or an fs URI.

The same code reads local folders, NFS mounts and object stores: a root containing ``://``
(``s3://bucket/tpr/cuhk``, ``gs://...``, ``file:///...``) goes through
``pyarrow.fs.FileSystem.from_uri``; anything else is a local path.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tpr_core.data.prepare import MANIFEST_NAME, MANIFEST_VERSION, SCHEMA, SPLITS, DataFormatError


class DatasetNotPreparedError(FileNotFoundError):
    """The root holds no prepared dataset (no manifest, or a shard it lists is missing)."""


def _resolve(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    text = os.fspath(root)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(text)


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the manifest of a prepared dataset.

    Args:
        root: Folder written by ``prepare`` (local path or URI).

    Returns:
        The manifest dict (counts, content hash, shards, ...).

    Raises:
        DatasetNotPreparedError: if ``root`` has no manifest.
        DataFormatError: if the manifest is not one this version reads.
    """
    fs, path = _resolve(root)
    mpath = f"{path}/{MANIFEST_NAME}"
    try:
        with fs.open_input_stream(mpath) as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetNotPreparedError(
            f"no prepared dataset at {os.fspath(root)}: {MANIFEST_NAME} not found (run `tpr data prepare`)"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{mpath}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        got = manifest.get("manifest_version") if isinstance(manifest, dict) else None
        raise DataFormatError(
            f"{mpath}: manifest_version {got!r} is not {MANIFEST_VERSION}; prepare the data again"
        )
    for key in ("shards", "counts", "content_hash", "source_format"):
        if key not in manifest:
            raise DataFormatError(f"{mpath}: field {key!r}: missing field")
    return manifest


def _shard_paths(
    root: str | os.PathLike[str], manifest: dict[str, Any], split: str | None
) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = _resolve(root)
    files = [f"{path}/{s['file']}" for s in manifest["shards"] if split is None or s["split"] == split]
    missing = [
        f for f, info in zip(files, fs.get_file_info(files), strict=True) if info.type != pafs.FileType.File
    ]
    if missing:
        raise DatasetNotPreparedError(
            f"prepared dataset at {os.fspath(root)} is incomplete: missing {missing[0]}"
        )
    return fs, files


def open_dataset(root: str | os.PathLike[str]) -> ds.Dataset:
    """All shards of a prepared dataset as one ``pyarrow.dataset.Dataset``, in written order.

    The shard list comes from the manifest, so stray files in the folder are never read.
    """
    manifest = read_manifest(root)
    fs, files = _shard_paths(root, manifest, None)
    return ds.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs)


def load_split_table(root: str | os.PathLike[str], split: str, columns: list[str] | None = None) -> pa.Table:
    """One split's rows, in the order written (pid, image path, caption index).

    Args:
        root: Folder written by ``prepare`` (local path or URI).
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
    manifest = read_manifest(root)
    fs, files = _shard_paths(root, manifest, split)
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    # Shards never mix splits (prepare starts a new one at each split), so whole files are
    # read in manifest order, which keeps the written row order without a sort.
    tables = [pq.read_table(f, columns=columns, filesystem=fs, schema=SCHEMA) for f in files]
    return pa.concat_tables(tables)
