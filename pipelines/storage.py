"""Run storage that is a local folder or a URI (``s3://``, ``gs://``, ``file://``), via pyarrow.fs.

Ray Train writes checkpoints to ``--runs-dir`` itself; what tpr writes there besides (the
run's tokenizer, the exported model, ``result.json``) goes through these helpers, so that a
sweep on a cluster with ``--runs-dir s3://BUCKET/runs`` needs no shared file system: workers
on other nodes read the tokenizer from the bucket, and the driver and the registry find the
exported model there. Paths and URIs are told apart and resolved by :mod:`tpr_core.data.store`
(:func:`~tpr_core.data.store.is_uri`, :func:`~tpr_core.data.store.resolve`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from tpr_core.data.store import is_uri, resolve


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_bytes(path: str, data: bytes) -> None:
    """Write a file (parents created) to a local path or a URI."""
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def upload_dir(local_dir: str | Path, dest: str) -> None:
    """Copy a local folder's files to ``dest`` (a URI or a local path), replacing what is there."""
    fs, p = resolve(dest)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def local_dir(path: str, cache_root: str | Path | None = None) -> str:
    """A local folder with the contents of ``path``: the path itself when local, else a copy.

    Copies live under ``cache_root`` (default: the system temp dir), keyed by the URI, and
    are made once per process tree: a complete copy is renamed into place.
    """
    if not is_uri(path):
        return path
    root = Path(cache_root or Path(tempfile.gettempdir()) / "tpr-remote")
    out = root / hashlib.sha1(path.encode()).hexdigest()[:16]
    if out.is_dir():
        return str(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"{path}: no such folder")
    pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
