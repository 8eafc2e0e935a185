"""tpr_core.data.store: one resolver for paths and URIs, and the manifest's version check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tpr_core.data.store import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DataFormatError,
    DatasetError,
    is_uri,
    load_split_table,
    open_prepared,
    read_manifest,
    resolve,
)


def test_is_uri():
    assert is_uri("s3://bucket/runs") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri("runs") and not is_uri("C:/x")


def test_resolve_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("data/set")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.join(str(tmp_path), "data", "set")
    assert resolve(Path("data/set"))[1] == path


def test_resolve_a_file_uri(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    fs, path = resolve(f"{tmp_path.as_uri()}/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)  # trailing slash dropped
    with fs.open_input_stream(f"{path}/a.txt") as f:
        assert f.read() == b"hello"


def test_resolve_a_bad_uri_names_it() -> None:
    with pytest.raises(ValueError, match="nosuchscheme://bucket/x"):
        resolve("nosuchscheme://bucket/x")


def test_a_manifest_of_another_version_is_refused_naming_the_file(tmp_path: Path) -> None:
    manifest = {"manifest_version": MANIFEST_VERSION + 1, "shards": [], "counts": {}, "content_hash": "",
                "source_format": "cuhk-pedes"}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    mpath = f"{tmp_path}/{MANIFEST_NAME}"
    for read in (read_manifest, open_prepared, lambda root: load_split_table(root, "train")):
        with pytest.raises(DatasetError, match=f"{mpath}: manifest_version {MANIFEST_VERSION + 1} is not"):
            read(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"shards": []}))  # no version at all
    with pytest.raises(DataFormatError, match=f"{mpath}: manifest_version None is not {MANIFEST_VERSION}"):
        read_manifest(tmp_path.as_uri())


def test_the_old_manifest_name_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": MANIFEST_VERSION}))
    with pytest.raises(FileNotFoundError, match=f"{MANIFEST_NAME} not found"):
        read_manifest(tmp_path)


def test_manifest_fields_and_shard_entries_are_checked(tmp_path: Path) -> None:
    base = {"manifest_version": MANIFEST_VERSION, "counts": {}, "content_hash": "",
            "source_format": "rstpreid"}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(base))
    with pytest.raises(DatasetError, match=r"_manifest.json: field 'shards': missing field"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**base, "shards": [{"file": "p.parquet"}]}))
    with pytest.raises(DatasetError, match=r"_manifest.json: shards\[0\]: missing field 'split'"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2")
    with pytest.raises(DatasetError, match=r"_manifest.json: invalid JSON at line 1"):
        read_manifest(tmp_path)
