"""Screenshots of a tpr MLflow store as a user sees it in the MLflow UI, by headless Chromium.

    python scripts/mlflow_screenshots.py RUNS_DIR OUT_DIR            # starts the store's server
    python scripts/mlflow_screenshots.py --tracking-uri URI OUT_DIR  # a server already running

Writes three PNGs into OUT_DIR, each with the page's rendered HTML next to it (``.html``, what
a test reads): ``experiment.png`` (the experiment's page, which opens on its
runs table), ``training_run.png`` (a finished training run: description, dataset, logged model,
metrics) and ``registered_model.png`` (the registered model's versions and aliases). Prints one
line per picture: its file and the page it shows.

It needs ``chromium`` (or ``chromium-browser``) on PATH; a missing browser is an error that says so.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

BROWSERS = ("chromium", "chromium-browser")
# Virtual time Chromium lets the page run (its requests to the server included) before the shot.
_PAGE_BUDGET_MS = 5_000
_WINDOW = (1800, 1300)


class Page(NamedTuple):
    file: str
    url: str
    what: str


class ScreenshotError(RuntimeError):
    """Nothing to show, or the browser could not take a picture."""


def find_browser() -> str | None:
    """The path of a Chromium on PATH, or None."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def pages(
    tracking_uri: str, experiment: str | None = None, model_name: str | None = None, run_id: str | None = None
) -> list[Page]:
    """The three pages to show: the experiment of run ``run_id`` (else of the newest finished
    run that logged a model, in ``experiment`` when given), that run, and ``model_name`` (else
    the registered model updated last)."""
    from mlflow import MlflowClient

    from pipelines.tracking import ui_url

    client = MlflowClient(tracking_uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ScreenshotError(f"no experiment named {experiment!r} at {tracking_uri}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, filter_string="attributes.status = 'FINISHED'", order_by=["start_time DESC"])
    trained = [r for r in runs if r.outputs and r.outputs.model_outputs]
    if run_id is not None:
        run = client.get_run(run_id)
    elif trained:
        run = trained[0]
    else:
        raise ScreenshotError(f"no finished run with a logged model at {tracking_uri}")
    if model_name is None:
        models = client.search_registered_models(order_by=["last_updated_timestamp DESC"], max_results=1)
        if not models:
            raise ScreenshotError(f"no registered model at {tracking_uri}")
        model_name = models[0].name
    exp_id = run.info.experiment_id
    return [
        Page("experiment.png", ui_url(tracking_uri, exp_id), f"experiment {exp_id}, its runs table"),
        Page("training_run.png", ui_url(tracking_uri, exp_id, run.info.run_id),
             f"run {run.info.run_name} ({run.info.run_id})"),  # fmt: skip
        Page("registered_model.png", ui_url(tracking_uri, model_name=model_name), f"registered model {model_name}"),
    ]


def screenshot(browser: str, url: str, out: Path, timeout_s: float = 120.0) -> Path:
    """One headless Chromium screenshot of ``url`` into ``out`` (PNG), and the page's rendered
    HTML into ``out`` with the suffix ``.html``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    html = out.with_suffix(".html")
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--hide-scrollbars", "--no-first-run", "--mute-audio",
        f"--window-size={_WINDOW[0]},{_WINDOW[1]}", f"--virtual-time-budget={_PAGE_BUDGET_MS}",
        "--dump-dom", f"--screenshot={out}", url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if not out.is_file() or out.stat().st_size == 0:
        tail = "\n".join((done.stderr or "").strip().splitlines()[-5:])
        raise ScreenshotError(f"{Path(browser).name} wrote no picture of {url} (exit {done.returncode}):\n{tail}")
    html.write_text(done.stdout)
    return out


@contextlib.contextmanager
def _server(runs_dir: str | None, tracking_uri: str | None) -> Iterator[str]:
    if tracking_uri:
        yield tracking_uri
        return
    from pipelines.env import scoped_env
    from pipelines.tracking_server import tracking_server

    with scoped_env(MLFLOW_TRACKING_URI=None), tracking_server(runs_dir) as uri:
        yield uri


def take(
    out_dir: str | Path, runs_dir: str | None = None, tracking_uri: str | None = None,
    experiment: str | None = None, model_name: str | None = None, run_id: str | None = None,
) -> list[tuple[Path, Page]]:
    """Screenshots of the three pages (see :func:`pages`) into ``out_dir``; starts the server of
    ``runs_dir``'s store unless ``tracking_uri`` names a running one."""
    browser = find_browser()
    if browser is None:
        raise ScreenshotError(f"no Chromium on PATH (looked for {', '.join(BROWSERS)})")
    if (runs_dir is None) == (tracking_uri is None):
        raise ValueError("give exactly one of runs_dir and tracking_uri")
    with _server(runs_dir, tracking_uri) as uri:
        return [(screenshot(browser, p.url, Path(out_dir) / p.file), p) for p in pages(uri, experiment, model_name, run_id)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir", nargs="?", help="the run directory whose store to show (runs/ of tpr commands)")
    ap.add_argument("out_dir", help="folder for the PNGs")
    ap.add_argument("--tracking-uri", help="a running MLflow server to show instead of RUNS_DIR's store")
    ap.add_argument("--experiment", help="experiment name (default: the one with the newest run)")
    ap.add_argument("--model", help="registered model name (default: the one updated last)")
    ap.add_argument("--run-id", help="training run to show (default: the newest finished one with a logged model)")
    args = ap.parse_args(argv)
    if (args.runs_dir is None) == (args.tracking_uri is None):
        ap.error("give RUNS_DIR or --tracking-uri, not both")
    try:
        shots = take(args.out_dir, args.runs_dir, args.tracking_uri, args.experiment, args.model, args.run_id)
    except ScreenshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, page in shots:
        print(f"{path}: {page.what}  {page.url}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
