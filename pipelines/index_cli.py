"""``tpr index`` and ``tpr search --index``: a model's embeddings of your own images, and
searching them by text or by image (:mod:`tpr_core.index` owns the index itself).

``pipelines/cli.py`` calls :func:`register` to add ``index``; ``tpr search`` (in
``registry_cli``) hands a search with ``--index`` or ``--image`` to :func:`search_index_cmd`.

A model is named as ``tpr search --model`` names it, a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, loaded with its registered weights hash checked) or a local folder:
an exported model folder (``tpr_core.export``) or a downloaded pyfunc model. Either way its
weights' SHA-256 is what an index is tied to. Exit 2 with one line naming the file, row or
model on any refusal.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.cli_errors import err_console, fail

console = Console()


@contextlib.contextmanager
def open_model(spec: str, runs_dir: str) -> Iterator[tuple[Any, str]]:
    """The loaded model (``Exported``) named by ``spec`` and the name to record for it.

    A local folder is read directly; anything else is a model URI fetched from the registry
    (``MLFLOW_TRACKING_URI``, or the store under ``runs_dir``) into a temporary folder.
    """
    from pipelines.registry import download_registered_model, exported_dir_of
    from pipelines.registry.common import torch_device
    from tpr_core.export import INFO_FILE, ExportError, load_exported

    local = Path(spec)
    with tempfile.TemporaryDirectory(prefix="tpr-index-model-") as tmp:
        if local.is_dir():
            folder = local if (local / INFO_FILE).is_file() else _exported_of_pyfunc(local)
            name = str(local.resolve())
        else:
            from pipelines.registry_cli import _mlflow

            with _mlflow(runs_dir):
                folder = exported_dir_of(download_registered_model(spec, tmp))
            name = spec
        try:
            exported = load_exported(folder, device=torch_device())
        except (ExportError, FileNotFoundError) as e:
            fail(str(e))
        yield exported, name


def _exported_of_pyfunc(folder: Path) -> Path:
    from pipelines.registry import RegistryError, exported_dir_of

    try:
        return exported_dir_of(folder)
    except RegistryError as e:
        fail(f"{folder} is neither an exported model folder nor an MLflow model: {e}")


def index_cmd(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@ALIAS, or an exported model folder.")],
    images: Annotated[
        str, typer.Option("--images", help="A folder of images (searched recursively) or a prepared dataset.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Index folder; an existing one is resumed.")],
    split: Annotated[str, typer.Option("--split", help="Split of a prepared dataset.")] = "test",
    captions: Annotated[
        bool, typer.Option("--captions", help="Index the split's captions (for --image queries).")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Rows per forward pass (default: the model's).")
    ] = None,
    part_rows: Annotated[
        int, typer.Option("--part-rows", min=1, help="Rows per Parquet part (the most a crash loses).")
    ] = 1024,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave unreadable images out (listed in _index.json).")
    ] = False,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=1, help="Largest image (width x height); larger ones are bad.")
    ] = 2048 * 2048,
    runs_dir: Annotated[
        str, typer.Option("--runs-dir", help="Run directory whose MLflow store is used for a models:/ URI.")
    ] = "runs",
) -> None:
    """Embed every image of a folder (or a prepared split) with a model, into a resumable index."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tpr_core.index import ImageIndexError, build_index

    with open_model(model, runs_dir) as (exported, name):
        columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("index", total=None)
            try:
                res = build_index(
                    exported, name, images, out, split=split, captions=captions, batch_size=batch_size,
                    part_rows=part_rows, skip_bad=skip_bad, max_pixels=max_pixels,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )  # fmt: skip
            except (ImageIndexError, ValueError, FileNotFoundError) as e:
                fail(str(e))
    kind = res.meta["kind"]
    console.print(
        f"index {escape(str(res.out))}: {res.rows} {kind}s ({res.added} added, {res.already} already there) "
        f"by {escape(name)} (weights sha256 {res.meta['weights_sha256'][:12]})"
    )
    if res.skipped:
        err_console.print(f"[yellow]skipped {len(res.skipped)} bad images (listed in _index.json)[/]")


def search_index_cmd(
    text: str | None,
    image: Path | None,
    index: str,
    model: str | None,
    top_k: int,
    fmt: str,
    runs_dir: str,
) -> None:
    """``tpr search`` over an index: a text against an index of images, an image against an
    index of images (image -> image) or of captions (image -> text)."""
    from tpr_core.index import (
        ImageIndexError,
        check_same_model,
        embed_image_file,
        embed_texts,
        load_index,
        search_index,
        weights_digest,
    )

    if (text is None) == (image is None):
        fail("give exactly one query: a TEXT or --image PATH")
    try:
        idx = load_index(index)
    except (ImageIndexError, ValueError, OSError) as e:
        fail(str(e))
    if text is not None and idx.kind != "image":
        fail(f"index {index} holds captions: a text query needs an index of images (query it with --image)")
    with open_model(model or idx.meta["model"], runs_dir) as (exported, name):
        try:
            check_same_model(idx.meta, index, name, weights_digest(exported))
            query = embed_texts(exported, [text]) if text is not None else embed_image_file(exported, image)
        except ImageIndexError as e:
            fail(str(e))
    (hits,) = search_index(idx, query, top_k)
    print_hits(hits, f"{name}: {text if text is not None else image} in {index}", fmt)


def print_hits(hits: list[dict[str, Any]], title: str, fmt: str) -> None:
    """Ranked hits as a table, or as a JSON list on stdout (``fmt`` ``json``)."""
    if fmt == "json":
        print(json.dumps(hits))
        return
    table = Table(title=escape(title))
    cols = ["rank"] + [c for c in ("path", "image_id", "person", "caption", "score") if hits and c in hits[0]]
    for col in cols:
        table.add_column(col, justify="left" if col in ("path", "caption") else "right")
    for i, h in enumerate(hits, 1):
        cells = [str(i)] + [f"{h[c]:.4f}" if c == "score" else escape(str(h[c])) for c in cols[1:]]
        table.add_row(*cells)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``index`` to the main app."""
    app.command("index")(index_cmd)
