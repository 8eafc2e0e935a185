"""``tpr import``: a released checkpoint (OpenAI CLIP, IRRA, FMFA, SEN) into tpr's model folder.

``pipelines/cli.py`` calls :func:`register` to add it to the main app. Exit 2 with one line
naming the file, key or object on any refusal; nothing is written then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipelines.cli_errors import fail

console = Console()


def import_cmd(
    src: Annotated[Path, typer.Argument(help="ViT-B-16.pt (openai-clip) or the authors' best.pth.")],
    fmt: Annotated[str, typer.Option("--format", help="openai-clip | irra | fmfa | sen")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (loads with tpr evaluate --checkpoint).")],
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML of the method and input sizes.")],
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", help="Hugging Face CLIP tokenizer folder; default the config's model.pretrained."),
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", min=1, help="Classifier size when the source has none.")
    ] = None,
) -> None:
    """Convert a released checkpoint, reading tensors only (no code in it runs)."""
    from tpr_core.authors import SOURCES, AuthorsImportError, import_checkpoint
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.experiment import load_config
    from tpr_core.export import ExportError
    from tpr_core.tensor_pickle import UnsafeCheckpointError

    if fmt not in SOURCES:
        fail(f"--format {fmt!r} is unknown; known: {', '.join(SOURCES)}")
    cfg = load_config(config)
    tok_dir = tokenizer or cfg.model.pretrained
    if tok_dir is None:
        fail(f"{config}: model.pretrained is unset; pass --tokenizer (a Hugging Face CLIP tokenizer folder)")
    try:
        tok = Tokenizer.from_clip(tok_dir, max_length=cfg.model.text_length)
        done = import_checkpoint(src, fmt, cfg, tok, out, num_classes=num_classes)
    except (AuthorsImportError, UnsafeCheckpointError, ExportError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"wrote {done.path} ({cfg.method}, {done.num_classes} classes) from {src} ({fmt})")
    if done.dropped:
        console.print(f"left out {len(done.dropped)} source keys tpr's {cfg.method} has no place for: "
                      f"{', '.join(done.dropped[:8])}{' ...' if len(done.dropped) > 8 else ''}")


def register(app: typer.Typer) -> None:
    """Add ``import`` to the main app."""
    app.command("import")(import_cmd)
