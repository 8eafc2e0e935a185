"""``tpr promote | rollback | evaluate | search | models``: the model registry commands.

``pipelines/cli.py`` calls :func:`register` to add them to the main app.

Every command talks to ``MLFLOW_TRACKING_URI`` when it is set; otherwise it uses the store under
``--runs-dir`` (default ``runs``, where ``tpr train`` logs): the commands that only read
(``search``, ``evaluate``, ``models``, ``promote --dry-run``) read it directly, the others start
the embedded tracking server on it. None of them creates a store: with none there, exit 2 and
a message naming the path.

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
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.cli_errors import err_console, fail
from pipelines.registry.common import EXIT_KEPT

console = Console()

# The dataset splits (tpr_core.data.store.SPLITS), as choices of --split and --gallery-split.
Split = Literal["train", "val", "test"]
# How tpr search prints its hits.
OutputFormat = Literal["table", "json"]

RunsDir = Annotated[
    str,
    typer.Option(
        "--runs-dir", help="Run directory whose MLflow store is used when MLFLOW_TRACKING_URI is unset."
    ),
]


def _user_errors() -> tuple[type[Exception], ...]:
    """What a registry command reports as one line and exit 2 (imported only when one is raised:
    a command without a store fails before MLflow and torch are loaded)."""
    from mlflow.exceptions import MlflowException

    from pipelines.registry.common import RegistryError
    from pipelines.tracking_server import TrackingServerError
    from tpr_core.export import ExportError

    return RegistryError, MlflowException, TrackingServerError, ExportError, FileNotFoundError


@contextlib.contextmanager
def _mlflow(runs_dir: str, read_only: bool = False) -> Iterator[str]:
    """The tracking URI for one command: the store read directly (``read_only``) or through the
    embedded server, never created; registry and data errors become a clean exit 2."""
    from pipelines.tracking_server import NoStoreError, read_store, tracking_server

    # Progress bars of artifact downloads would drown the command's own output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with read_store(runs_dir) if read_only else tracking_server(runs_dir, create=False) as uri:
            yield uri
    except NoStoreError as e:
        fail(str(e))
    except _user_errors() as e:
        fail(str(e))


def _metrics_table(title: str, columns: dict[str, dict[str, float] | None]) -> Table:
    from tpr_core.eval.metrics import REPORTED_METRICS

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
    split: Annotated[Split, typer.Option("--split", help="Evaluation split of the gate.")] = "val",
    data: Annotated[
        str | None, typer.Option("--data", help="Prepared dataset; default the model's data.root.")
    ] = None,
    gallery_split: Annotated[
        Split, typer.Option("--gallery-split", help="Split whose images the served model searches.")
    ] = "test",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Evaluate both and say what the gate would decide; register nothing."),
    ] = False,
    runs_dir: RunsDir = "runs",
    break_lock: BreakLock = False,
) -> None:
    """Register a run's model and make it champion only if it beats the current one."""
    if (run is None) == (sweep is None):
        fail("give exactly one of --run RUN_ID or --sweep SWEEP_RUN_ID")
    if dry_run and break_lock:
        fail("--dry-run changes nothing: it cannot --break-lock")
    with _mlflow(runs_dir, read_only=dry_run):
        from pipelines.registry import preview_promotion, promote

        if dry_run:
            res = preview_promotion(
                model_name, run_id=run, sweep_run_id=sweep, margin=margin, split=split, data_root=data
            )
        else:
            _break_lock_if(break_lock, model_name)
            res = promote(
                model_name, run_id=run, sweep_run_id=sweep, margin=margin, split=split, data_root=data,
                gallery_split=gallery_split,
            )  # fmt: skip
    cols = {f"challenger v{res.version}" if res.version else "challenger": res.challenger_metrics}
    if res.compared_with is not None:
        cols[f"champion v{res.compared_with}"] = res.champion_metrics
    console.print(_metrics_table(f"{res.model_name} on split {res.split!r}", cols))
    color = "green" if res.promoted else "yellow"
    if dry_run:
        console.print(f"dry run: [{color}]would be {res.decision}[/]: {res.reason}; the run's model is "
                      f"{res.model_uri}; nothing was registered")
    else:
        console.print(f"[{color}]{res.decision}[/]: {res.reason}; champion is v{res.champion} ({res.model_uri})")
    raise typer.Exit(res.exit_code)


def rollback_cmd(
    model_name: Annotated[str, typer.Option("--model-name", help="Registered model name.")],
    runs_dir: RunsDir = "runs",
    break_lock: BreakLock = False,
) -> None:
    """Move the champion back to the previous champion."""
    with _mlflow(runs_dir):
        from pipelines.registry import rollback

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
    split: Annotated[Split, typer.Option("--split", help="Split to evaluate.")] = "test",
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for metrics.json and the pictures.")
    ] = None,
    runs_dir: RunsDir = "runs",
) -> None:
    """Metrics, retrieval grid and recall curve of a registered or exported model."""
    if (model is None) == (checkpoint is None):
        fail("give exactly one of --model models:/NAME@ALIAS or --checkpoint DIR")
    with tempfile.TemporaryDirectory(prefix="tpr-evaluate-") as tmp:
        if model is not None:
            with _mlflow(runs_dir, read_only=True):
                from pipelines.registry import download_registered_model, exported_dir_of

                folder = exported_dir_of(download_registered_model(model, tmp))
        else:
            folder = checkpoint
        from pipelines.registry import evaluate_exported
        from pipelines.registry.common import torch_device
        from tpr_core.export import ExportError, load_exported

        try:
            exported = load_exported(folder, device=torch_device())
            res = evaluate_exported(exported, data, split, topk=10)
        except (ExportError, ValueError, FileNotFoundError) as e:
            fail(str(e))
    console.print(
        _metrics_table(f"{model or checkpoint} on {res.data_root} split {split!r}", {"": res.metrics})
    )
    if out is not None:
        from tpr_core.eval import recall_curve, retrieval_grid_from_ranks

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
    fmt: Annotated[OutputFormat, typer.Option("--format", help="A table, or JSON on stdout.")] = "table",
    runs_dir: RunsDir = "runs",
) -> None:
    """Rank the model's gallery (or an index) for a text or an image: prints paths and scores."""
    from pipelines.index_cli import print_hits, search_index_cmd

    if index is not None or image is not None:
        if index is None:
            fail("--image needs --index INDEX (an index of images or captions made by tpr index)")
        if out is not None:
            fail("--out draws the model's gallery; it does not combine with --index")
        return search_index_cmd(text, image, index, model, top_k, fmt, runs_dir)
    if text is None or model is None:
        fail("give a TEXT and --model (or --index INDEX)")
    with _mlflow(runs_dir, read_only=True):
        from pipelines.registry import search

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


def models_cmd(
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="List this model's versions instead of all models.")
    ] = None,
    runs_dir: RunsDir = "runs",
) -> None:
    """List the registered models and their aliases, or one model's versions and gate decisions."""
    from pipelines.registry.listing import list_models, list_versions

    with _mlflow(runs_dir, read_only=True) as uri:
        rows = list_models() if model_name is None else list_versions(model_name)
    if model_name is None and not rows:
        console.print(f"no registered models in {escape(uri)}")
        return
    if model_name is None:
        table = Table(title="registered models")
        for col in ("model", "versions", "aliases"):
            table.add_column(col)
        for r in rows:
            aliases = ", ".join(f"{a} v{v}" for a, v in sorted(r["aliases"].items()))
            table.add_row(escape(r["name"]), str(r["versions"]), aliases or "-")
    else:
        table = Table(title=f"{escape(model_name)}: versions")
        for col in ("version", "aliases", "decision", "gate R1", "source run"):
            table.add_column(col, justify="right" if col in ("version", "gate R1") else "left")
        for r in rows:
            r1 = f"{r['r1']:.2f} ({r['split']})" if r["r1"] is not None else "-"
            table.add_row(str(r["version"]), ", ".join(r["aliases"]) or "-", r["decision"] or "-", r1,
                          r["source_run_id"] or "-")  # fmt: skip
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``promote``, ``rollback``, ``evaluate``, ``search`` and ``models`` to the ``tpr`` app."""
    promote_help = f"Register a run's model and gate the champion (exit {EXIT_KEPT} if kept, or would be with --dry-run)."
    app.command("promote", help=promote_help)(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("search")(search_cmd)
    app.command("models")(models_cmd)
