"""``tpr promote | rollback | evaluate | search``: the model registry commands.

``pipelines/cli.py`` calls :func:`register` to add them to the main app.

Every command talks to ``MLFLOW_TRACKING_URI`` when it is set; otherwise it starts the embedded
tracking server on the store under ``--runs-dir`` (default ``runs``, where ``tpr train`` logs).

Exit codes: 0 success (``promote``: promoted), 3 ``promote`` kept the champion
(:data:`pipelines.registry.EXIT_KEPT`), 2 usage, registry or data error.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.cli_errors import err_console, fail
from pipelines.registry import EXIT_KEPT
from tpr_core.eval.metrics import REPORTED_METRICS

console = Console()

RunsDir = Annotated[
    str,
    typer.Option(
        "--runs-dir", help="Run directory whose MLflow store is used when MLFLOW_TRACKING_URI is unset."
    ),
]


@contextlib.contextmanager
def _mlflow(runs_dir: str) -> Iterator[str]:
    """The tracking URI for one command; registry and data errors become a clean exit 2."""
    from mlflow.exceptions import MlflowException

    from pipelines.registry import RegistryError
    from pipelines.tracking_server import TrackingServerError, tracking_server
    from tpr_core.export import ExportError

    # Progress bars of artifact downloads would drown the command's own output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with tracking_server(runs_dir) as uri:
            yield uri
    except (RegistryError, MlflowException, TrackingServerError, ExportError, FileNotFoundError) as e:
        fail(str(e))


def _metrics_table(title: str, columns: dict[str, dict[str, float] | None]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for k in REPORTED_METRICS:
        table.add_row(k, *[f"{m[k]:.2f}" if m and k in m else "-" for m in columns.values()])
    return table


BreakLock = Annotated[
    bool,
    typer.Option("--break-lock", help="First remove the model's promotion lock (its owner must be gone)."),
]


def _break_lock_if(wanted: bool, model_name: str) -> None:
    from pipelines.registry import break_lock

    if wanted:
        holder = break_lock(model_name)
        console.print(f"removed the promotion lock held by {escape(holder)}" if holder else "no promotion lock was held")


def promote_cmd(
    model_name: Annotated[str, typer.Option("--model-name", help="Registered model name.")],
    run: Annotated[str | None, typer.Option("--run", help="MLflow run id of a training run.")] = None,
    sweep: Annotated[
        str | None, typer.Option("--sweep", help="MLflow run id of a sweep (its best trial is registered).")
    ] = None,
    margin: Annotated[
        float, typer.Option("--margin", min=0.0, help="R@1 points the challenger must gain.")
    ] = 0.0,
    split: Annotated[str, typer.Option("--split", help="Evaluation split of the gate.")] = "val",
    data: Annotated[
        str | None, typer.Option("--data", help="Prepared dataset; default the model's data.root.")
    ] = None,
    gallery_split: Annotated[
        str, typer.Option("--gallery-split", help="Split whose images the served model searches.")
    ] = "test",
    runs_dir: RunsDir = "runs",
    break_lock: BreakLock = False,
) -> None:
    """Register a run's model and make it champion only if it beats the current one."""
    from pipelines.registry import promote

    if (run is None) == (sweep is None):
        fail("give exactly one of --run RUN_ID or --sweep SWEEP_RUN_ID")
    with _mlflow(runs_dir):
        _break_lock_if(break_lock, model_name)
        res = promote(
            model_name, run_id=run, sweep_run_id=sweep, margin=margin, split=split, data_root=data,
            gallery_split=gallery_split,
        )  # fmt: skip
    cols = {f"challenger v{res.version}": res.challenger_metrics}
    if res.compared_with is not None:
        cols[f"champion v{res.compared_with}"] = res.champion_metrics
    console.print(_metrics_table(f"{res.model_name} on split {res.split!r}", cols))
    color = "green" if res.promoted else "yellow"
    console.print(f"[{color}]{res.decision}[/]: {res.reason}; champion is v{res.champion} ({res.model_uri})")
    raise typer.Exit(res.exit_code)


def rollback_cmd(
    model_name: Annotated[str, typer.Option("--model-name", help="Registered model name.")],
    runs_dir: RunsDir = "runs",
    break_lock: BreakLock = False,
) -> None:
    """Move the champion back to the previous champion."""
    from pipelines.registry import rollback

    with _mlflow(runs_dir):
        _break_lock_if(break_lock, model_name)
        res = rollback(model_name)
    prev = f"v{res.previous_champion}" if res.previous_champion else "none"
    console.print(
        f"rolled back {res.model_name}: champion v{res.from_version} -> v{res.to_version}; previous-champion {prev}"
    )


def evaluate_cmd(
    model: Annotated[
        str | None, typer.Option("--model", help="models:/NAME@ALIAS (or any model URI).")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="An exported model folder.")] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Prepared dataset; default the model's data.root.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate.")] = "test",
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for metrics.json and the pictures.")
    ] = None,
    runs_dir: RunsDir = "runs",
) -> None:
    """Metrics, retrieval grid and recall curve of a registered or exported model."""
    from pipelines.registry import download_registered_model, evaluate_exported, exported_dir_of
    from pipelines.registry.common import torch_device
    from tpr_core.eval import recall_curve, retrieval_grid_from_ranks
    from tpr_core.export import ExportError, load_exported

    if (model is None) == (checkpoint is None):
        fail("give exactly one of --model models:/NAME@ALIAS or --checkpoint DIR")
    with tempfile.TemporaryDirectory(prefix="tpr-evaluate-") as tmp:
        if model is not None:
            with _mlflow(runs_dir):
                folder = exported_dir_of(download_registered_model(model, tmp))
        else:
            folder = checkpoint
        try:
            exported = load_exported(folder, device=torch_device())
            res = evaluate_exported(exported, data, split, topk=10)
        except (ExportError, ValueError, FileNotFoundError) as e:
            fail(str(e))
    console.print(
        _metrics_table(f"{model or checkpoint} on {res.data_root} split {split!r}", {"": res.metrics})
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(res.metrics, indent=2) + "\n")
        d = res.split_data
        captions = [d.caption(i) for i in range(len(d))]
        retrieval_grid_from_ranks(
            res.result.t2i, captions, d.image_bytes, out / "retrieval_grid.png", n=8, k=10
        )
        recall_curve(res.result.t2i, out / "recall_at_k.png")
        console.print(
            f"wrote {out / 'metrics.json'}, {out / 'retrieval_grid.png'}, {out / 'recall_at_k.png'}"
        )


def search_cmd(
    text: Annotated[str | None, typer.Argument(help="Description of the person to find.")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="models:/NAME@champion (or any retrieval model URI; with --index also a folder)."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Images to return.")] = 10,
    out: Annotated[Path | None, typer.Option("--out", help="Write the retrieval grid here (PNG).")] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Prepared dataset holding the gallery images (for --out).")
    ] = None,
    person: Annotated[
        int | None, typer.Option("--person", help="Dataset person id the text describes (colours the grid).")
    ] = None,
    index: Annotated[
        str | None, typer.Option("--index", help="Search this index (tpr index) instead of the model's gallery.")
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Query by this image instead of a text (needs --index).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    runs_dir: RunsDir = "runs",
) -> None:
    """Rank the model's gallery (or an index) for a text or an image: prints paths and scores."""
    from pipelines.index_cli import print_hits, search_index_cmd
    from pipelines.registry import search

    if fmt not in ("table", "json"):
        fail(f"--format {fmt!r} is unknown; expected table or json")
    if index is not None or image is not None:
        if index is None:
            fail("--image needs --index INDEX (an index of images or captions made by tpr index)")
        if out is not None:
            fail("--out draws the model's gallery; it does not combine with --index")
        return search_index_cmd(text, image, index, model, top_k, fmt, runs_dir)
    if text is None or model is None:
        fail("give a TEXT and --model (or --index INDEX)")
    with _mlflow(runs_dir):
        hits = search(text, model, top_k=top_k, out=out, data_root=data, person=person)
    if fmt == "json":
        return print_hits(hits.rows, "", fmt)
    table = Table(title=f"{model}: {text}")
    for col in ("rank", "image_id", "image_path", "person", "score"):
        table.add_column(col, justify="left" if col == "image_path" else "right")
    for i, h in enumerate(hits.rows, 1):
        table.add_row(str(i), str(h["image_id"]), h["image_path"], str(h["orig_id"]), f"{h['score']:.4f}")
    console.print(table)
    if hits.grid is not None:
        console.print(f"wrote {escape(str(hits.grid))}" + (f" ({escape(hits.note)})" if hits.note else ""))
    elif out is not None:
        err_console.print(f"[yellow]no grid written:[/] {escape(hits.note)}")


def register(app: typer.Typer) -> None:
    """Add ``promote``, ``rollback``, ``evaluate`` and ``search`` to the ``tpr`` app."""
    app.command("promote", help=f"Register a run's model and gate the champion (exit {EXIT_KEPT} if kept).")(
        promote_cmd
    )
    app.command("rollback")(rollback_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("search")(search_cmd)
