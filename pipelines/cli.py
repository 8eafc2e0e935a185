"""The ``tpr`` command: subcommands mapped to plain functions."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from pipelines.cli_errors import fail, print_error
from tpr_core.config import ConfigError
from tpr_core.data.formats import FORMATS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Text-based person retrieval pipeline.")
data_app = typer.Typer(no_args_is_help=True, help="Generate or prepare datasets.")
app.add_typer(data_app, name="data")

console = Console()


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise typer.BadParameter(f"expected HxW such as 384x128, got {text!r}") from None


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Output folder (CUHK-PEDES layout)."),
    identities: int = typer.Option(300, "--identities", min=6),
    images_per_identity: int = typer.Option(4, "--images-per-identity", min=1),
    captions_per_image: int = typer.Option(2, "--captions-per-image", min=1, max=5),
    seed: int = typer.Option(0, "--seed"),
    size: str = typer.Option("384x128", "--size", help="Image size HxW."),
) -> None:
    """Write a synthetic pedestrian dataset in the CUHK-PEDES layout."""
    from tpr_core.data.synth import generate

    summary = generate(
        out,
        identities=identities,
        images_per_identity=images_per_identity,
        captions_per_image=captions_per_image,
        seed=seed,
        size=_parse_hw(size),
    )
    console.print(summary)


@data_app.command("prepare")
def data_prepare(
    fmt: str = typer.Option(..., "--format", help=" | ".join(FORMATS)),
    root: Path = typer.Option(..., "--root", help="Raw dataset folder as distributed."),
    out: Path = typer.Option(..., "--out", help="Output folder for Parquet shards + _manifest.json."),
    shard_rows: int = typer.Option(2048, "--shard-rows", min=1, help="Rows per Parquet shard."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records, list them in the manifest."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", min=0.0, max=0.5, help="ICFG-PEDES: share of train identities held out as val."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the ICFG-PEDES val split."),
    max_pixels: int = typer.Option(
        2048 * 2048, "--max-pixels", min=1, help="Largest image (width x height); larger ones are bad records."
    ),
) -> None:
    """Validate a raw dataset and write it as Parquet shards."""
    from tpr_core.data.prepare import DataFormatError, prepare

    try:
        manifest = prepare(
            fmt, root, out, shard_rows=shard_rows, skip_bad=skip_bad, val_fraction=val_fraction, seed=seed,
            max_pixels=max_pixels,
        )
    except DataFormatError as e:
        fail(str(e))
    console.print(f"wrote {out} ({manifest['source_format']}): {manifest['counts']}")
    if manifest.get("skipped"):
        console.print(f"[yellow]skipped {len(manifest['skipped'])} bad records (listed in _manifest.json)[/]")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Path = typer.Argument(..., help="Experiment YAML (pipelines/configs/...)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides key=value."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Storage root (local path or s3://...)."),
    name: str = typer.Option(None, "--name", help="Run name; the same name resumes a crashed run."),
) -> None:
    """Train one method on Ray Train workers with DeepSpeed; tracked in MLflow."""
    from pipelines.train import train
    from tpr_core.experiment import load_config

    cfg = load_config(config, overrides or [])
    m = train(cfg, runs_dir=runs_dir, name=name)
    _print_result(m)


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="Base experiment YAML for every trial."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides key=value for the base config."),
    space: Path = typer.Option(..., "--space", help="Search space (tune_spaces/NAME.yaml)."),
    samples: int = typer.Option(None, "--samples", min=1, help="Trials (default: the space file's)."),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=1, help="Trials at once (default: what fits)."),
    name: str = typer.Option(None, "--name", help="Sweep name (needed for --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep called --name."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Storage root (local path or s3://...)."),
    seed: int = typer.Option(0, "--seed", help="Searcher seed."),
) -> None:
    """Search loss weights and mask ratios with Ray Tune; every trial a distributed training."""
    from pipelines.sweep import sweep
    from tpr_core.experiment import load_config

    if resume and not name:
        raise typer.BadParameter("--resume needs --name SWEEP")
    cfg = load_config(config, overrides or [])
    out = sweep(cfg, space, runs_dir=runs_dir, samples=samples, max_concurrent=max_concurrent, name=name,
                resume=resume, seed=seed)
    from rich.table import Table

    t = Table(title=f"sweep {out['sweep_name']}: {len(out['trials'])} trials")
    keys = [k for k in out["trials"][0] if k not in ("mlflow_run_id",)] if out["trials"] else []
    for k in keys:
        t.add_column(k)
    for r in out["trials"]:
        t.add_row(*[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys])
    console.print(t)
    console.print(f"best {out['metric']}: {out.get('best_metric')} with {out.get('best_params')}")
    console.print(f"MLflow parent run: {out['parent_run_id']}")


def _print_result(m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {m.get('run_name')}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("best/epoch", "best/val_R1", "test/R1", "test/R5", "test/R10", "test/mAP", "test/mINP"):
        if m.get(k) is not None:
            v = m[k]
            t.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(t)
    console.print(f"MLflow run: {m.get('mlflow_run_id') or '-'}")
    console.print(f"model folder: {m.get('model_dir')}")


@app.command("demo")
def demo_cmd(
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where runs, MLflow store and pictures go."),
    data_dir: str = typer.Option("data/synthetic-demo", "--data-dir", help="Synthetic data (generated once)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer steps (CI); the same code path."),
    model_name: str = typer.Option("tpr-demo", "--model-name", help="Registered model name."),
) -> None:
    """Synthetic data, IRRA baseline, FMFA sweep, promoted champion, text queries, metrics table."""
    from pipelines.demo import demo

    demo(runs_dir=runs_dir, data_dir=data_dir, quick=quick, model_name=model_name, console=console)


from pipelines import registry_cli  # noqa: E402  (adds promote, rollback, evaluate, search)

registry_cli.register(app)

from pipelines import import_cli, index_cli  # noqa: E402  (adds import, index)

import_cli.register(app)
index_cli.register(app)


def main() -> None:  # pragma: no cover
    try:
        app()
    except ConfigError as e:
        print_error(str(e))
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
