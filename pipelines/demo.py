"""``tpr demo``: the whole pipeline on one machine, nothing started by hand.

Synthetic pedestrians (generated once) -> the IRRA baseline on 2 Ray workers with ZeRO-2 ->
a 4-trial FMFA loss-weight sweep with ASHA -> both promoted through the registry gate
(the better one is ``champion``) -> two text queries answered by the champion -> a table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tpr_core.eval.metrics import REPORTED_METRICS as METRICS

CONFIGS = Path(__file__).resolve().parent / "configs"
SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


def _sample_queries(raw_root: str, data_root: str, n: int = 2) -> list[tuple[str, int]]:
    """Descriptions of test identities, written from their attributes (not copied captions)."""
    import json

    import numpy as np

    from tpr_core.data.dataset import load_split
    from tpr_core.data.synth import describe

    attrs = json.loads(Path(raw_root, "attributes.json").read_text())
    test = load_split(data_root, "test")
    raw = json.loads(Path(raw_root, "reid_raw.json").read_text())
    test_ids = sorted({r["id"] for r in raw if r["split"] == "test"})
    rng = np.random.default_rng(7)
    out = []
    for pid_orig in test_ids[:n]:
        text = describe(attrs[str(pid_orig)], rng, view=None)
        out.append((text, pid_orig))
    del test
    return out


def demo(runs_dir: str | Path = "runs", data_dir: str | Path = "data/synthetic-demo", quick: bool = False,
         model_name: str = "tpr-demo", console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns what it printed as data (metrics, run ids, picture paths)."""
    from pipelines.registry import promote, search
    from pipelines.setup import init_ray
    from pipelines.sweep import sweep
    from pipelines.tracking_server import store_uri_for_ui, tracking_server
    from pipelines.train import train
    from tpr_core.experiment import load_config

    console = console or Console()
    runs_dir = Path(runs_dir).resolve()
    data_dir = Path(data_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_over = [f"data.root={data_dir / 'parquet'}", f"data.raw_root={data_dir / 'raw'}"]
    if quick:  # CI: the same path, fewer steps
        base_over = ["train.epochs=4", "train.eval_every=2", "train.checkpoint_every=2",
                     "train.max_steps_per_epoch=12"]
        trial_over = ["train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1",
                      "train.max_steps_per_epoch=6", "data.batch_size=32"]
    else:
        base_over = ["train.epochs=6", "train.eval_every=2", "train.checkpoint_every=2"]
        trial_over = ["train.epochs=4", "train.eval_every=1", "train.checkpoint_every=1",
                      "train.max_steps_per_epoch=25", "data.batch_size=32"]
    t0 = time.time()
    out: dict[str, Any] = {}
    with tracking_server(runs_dir, while_starting=init_ray):  # Ray starts while MLflow boots
        console.rule("[bold]1/4 baseline: IRRA, 2 workers, ZeRO-2")
        base_cfg = load_config(CONFIGS / "irra_synthetic_tiny.yaml", data_over + base_over)
        base = train(base_cfg, runs_dir=runs_dir, name=f"demo-irra-{stamp}")
        out["baseline"] = base

        console.rule("[bold]2/4 sweep: FMFA loss weights, 4 trials, ASHA")
        sw_cfg = load_config(
            CONFIGS / "fmfa_synthetic_tiny.yaml",
            data_over + trial_over + ["distributed.num_workers=1", "distributed.zero_stage=2"],
        )
        sw = sweep(sw_cfg, SPACES / "fmfa_demo.yaml", runs_dir=runs_dir, samples=4, name=f"demo-fmfa-{stamp}")
        out["sweep"] = sw

        console.rule("[bold]3/4 registry: promote through the gate (val split)")
        p_base = promote(model_name, run_id=base["mlflow_run_id"])
        console.print(f"baseline -> version {p_base.version}: {p_base.decision} ({p_base.reason})")
        p_sweep = promote(model_name, sweep_run_id=sw["parent_run_id"])
        console.print(f"sweep best -> version {p_sweep.version}: {p_sweep.decision} ({p_sweep.reason})")
        out["promotions"] = [p_base, p_sweep]

        console.rule(f"[bold]4/4 search: text queries to models:/{model_name}@champion")
        pics = []
        queries = _sample_queries(str(data_dir / "raw"), str(data_dir / "parquet"))
        for i, (text, pid) in enumerate(queries):
            png = runs_dir / "demo" / stamp / f"query-{i + 1}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            res = search(text, f"models:/{model_name}@champion", top_k=10, out=png)
            console.print(f"[bold]query {i + 1}[/] (person {pid}): {text}")
            for r, row in enumerate(res.rows[:5], 1):
                hit = "*" if row.get("orig_id") == pid else " "
                console.print(f"  {r:2d}.{hit} image {row['image_id']}  {row['image_path']}  score {row['score']:.3f}")
            console.print("  (* = the described person)")
            pics.append(str(res.grid or png))
        out["pictures"] = pics

    table = Table(title="tpr demo: baseline vs sweep best (test split, %)")
    table.add_column("model")
    for k in METRICS:
        table.add_column(k, justify="right")
    table.add_row("IRRA baseline", *[f"{base[f'test/{k}']:.2f}" for k in METRICS])
    best_test = _best_trial_test_metrics(sw)
    if best_test:
        table.add_row("FMFA sweep best", *[f"{best_test.get(f'test/{k}', float('nan')):.2f}" for k in METRICS])
    console.rule("[bold]done")
    console.print(table)
    console.print(f"champion: models:/{model_name}@champion (version {p_sweep.champion})")
    console.print(f"MLflow UI: {store_uri_for_ui(runs_dir)}")
    console.print("retrieval grids: " + ", ".join(pics))
    console.print(f"took {time.time() - t0:.0f} s")
    out["best_test"] = best_test
    return out


def _best_trial_test_metrics(sw: dict[str, Any]) -> dict[str, float]:
    import json

    from pipelines.storage import exists, read_text

    d = sw.get("best_model_dir")
    if d and exists(f"{d}/metrics.json"):
        return json.loads(read_text(f"{d}/metrics.json"))
    return {}
