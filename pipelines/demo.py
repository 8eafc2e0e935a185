"""``tpr demo``: the whole pipeline on one machine, nothing started by hand.

Synthetic pedestrians (generated once) -> the IRRA baseline on 2 Ray workers with ZeRO-2 ->
a 4-trial sweep of that baseline's own loss weights and MLM mask ratio (ASHA), every trial
with the baseline's budget -> both promoted through the registry gate (on val; the better one
is ``champion``) -> two text queries answered by the champion -> one table of the baseline,
every trial and the champion, read back from MLflow and printed only when every row trained
under the same budget (:mod:`pipelines.demo_report`), and a sentence saying whether the
sweep won.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines.demo_report import Row, build_table, read_row, trial_run_ids, verdict

CONFIGS = Path(__file__).resolve().parent / "configs"
SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"
SPACE = SPACES / "irra_demo.yaml"
# One budget for the baseline and every trial, so the table compares loss weights, not
# budgets: 26 steps is one epoch of the synthetic train split at batch 64 (2 workers x 32).
BUDGET = ["train.epochs=6", "train.max_steps_per_epoch=26", "train.eval_every=2", "train.checkpoint_every=2",
          "data.batch_size=64", "distributed.num_workers=2", "distributed.grad_accum=1"]
# --quick (CI): the same path and the same equal budgets, shorter.
QUICK_BUDGET = ["train.epochs=4", "train.max_steps_per_epoch=6", "train.eval_every=2", "train.checkpoint_every=2",
                "data.batch_size=64", "distributed.num_workers=2", "distributed.grad_accum=1"]
QUICK_SAMPLES = 2



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
    """Run the demo; returns what it printed as data (rows, promotions, verdict, picture paths)."""
    from pipelines.registry import promote
    from pipelines.setup import init_ray
    from pipelines.space import load_space
    from pipelines.sweep import sweep
    from pipelines.tracking_server import store_uri_for_ui, tracking_server
    from pipelines.train import train
    from tpr_core.experiment import load_config

    console = console or Console()
    runs_dir = Path(runs_dir).resolve()
    data_dir = Path(data_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_over = [f"data.root={data_dir / 'parquet'}", f"data.raw_root={data_dir / 'raw'}"]
    cfg = load_config(CONFIGS / "irra_synthetic_tiny.yaml", data_over + (QUICK_BUDGET if quick else BUDGET))
    space = load_space(SPACE, cfg)  # a bad space stops the demo before anything trains
    samples = QUICK_SAMPLES if quick else space.samples
    searched = list(space.params)
    t0 = time.time()
    out: dict[str, Any] = {}
    with tracking_server(runs_dir, while_starting=init_ray):  # Ray starts while MLflow boots
        console.rule("[bold]1/4 baseline: IRRA, 2 workers, ZeRO-2")
        base = train(cfg, runs_dir=runs_dir, name=f"demo-irra-{stamp}")
        out["baseline"] = base

        console.rule(f"[bold]2/4 sweep: the baseline's loss weights and mask ratio, {samples} trials, "
                     "ASHA, the baseline's budget")
        sw_name = f"demo-irra-sweep-{stamp}"
        sw = sweep(cfg, SPACE, runs_dir=runs_dir, samples=samples, name=sw_name)
        sweep_run = _sweep_run_id(sw, cfg.tracking.experiment, sw_name)
        out["sweep"] = sw

        console.rule("[bold]3/4 registry: promote through the gate (val split)")
        p_base = promote(model_name, run_id=base["mlflow_run_id"])
        console.print(f"baseline -> version {p_base.version}: {p_base.decision} ({p_base.reason})")
        p_sweep = None
        if _has_best_trial(sweep_run):
            p_sweep = promote(model_name, sweep_run_id=sweep_run)
            console.print(f"sweep best -> version {p_sweep.version}: {p_sweep.decision} ({p_sweep.reason})")
        else:
            console.print("sweep best: no trial finished, nothing to promote")
        out["promotions"] = [p for p in (p_base, p_sweep) if p is not None]
        champion = (p_sweep or p_base).champion

        console.rule(f"[bold]4/4 search: text queries to models:/{model_name}@champion")
        out["pictures"] = _queries(console, runs_dir / "demo" / stamp, data_dir, model_name)
        rows = _rows(base["mlflow_run_id"], sweep_run, searched, model_name, champion, out["promotions"])

    console.rule("[bold]done")
    console.print(build_table(rows, searched))  # refuses (UnequalBudgets) rows of unequal budgets
    out["rows"] = rows
    out["verdict"] = _verdict(rows, p_base, p_sweep)
    console.print(out["verdict"], soft_wrap=True)
    console.print(f"champion: models:/{model_name}@champion (version {champion})")
    console.print(f"MLflow UI: {store_uri_for_ui(runs_dir)}")
    console.print("retrieval grids: " + ", ".join(out["pictures"]))
    console.print(f"took {time.time() - t0:.0f} s")
    return out


def _sweep_run_id(sw: dict[str, Any], experiment: str, name: str) -> str:
    """The sweep's parent MLflow run: from its summary, else by its run key (``sweep:NAME``)."""
    from pipelines import tracking
    from pipelines.sweep import SWEEP_KEY_PREFIX

    found = sw.get("parent_run_id") or tracking.find_run(experiment, SWEEP_KEY_PREFIX + name)
    if not found:
        raise RuntimeError(f"sweep {name}: no MLflow parent run found in experiment {experiment!r}")
    return found


def _has_best_trial(sweep_run_id: str) -> bool:
    from mlflow import MlflowClient

    from pipelines.tracking import BEST_TRIAL_TAG

    return bool(MlflowClient().get_run(sweep_run_id).data.tags.get(BEST_TRIAL_TAG))


def _queries(console: Console, out_dir: Path, data_dir: Path, model_name: str) -> list[str]:
    """Two descriptions of test identities searched with the champion; returns the grid pictures."""
    from pipelines.registry import search

    pics = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (text, pid) in enumerate(_sample_queries(str(data_dir / "raw"), str(data_dir / "parquet"))):
        png = out_dir / f"query-{i + 1}.png"
        res = search(text, f"models:/{model_name}@champion", top_k=10, out=png)
        console.print(f"[bold]query {i + 1}[/] (person {pid}): {text}")
        for r, row in enumerate(res.rows[:5], 1):
            hit = "*" if row.get("orig_id") == pid else " "
            console.print(f"  {r:2d}.{hit} image {row['image_id']}  {row['image_path']}  score {row['score']:.3f}")
        console.print("  (* = the described person)")
        pics.append(str(res.grid or png))
    return pics


def _rows(base_run: str, sweep_run: str, searched: list[str], model_name: str, champion: str,
          promotions: list[Any]) -> list[Row]:
    """Baseline, each trial (oldest first) and the champion, as MLflow recorded them."""
    from mlflow import MlflowClient

    client = MlflowClient()
    rows = [read_row(client, base_run, "baseline", searched)]
    rows += [read_row(client, rid, f"trial {i}", searched)
             for i, rid in enumerate(trial_run_ids(client, sweep_run), 1)]
    sources = {p.version: p.source_run_id for p in promotions}
    source = sources.get(champion) or _version_source(client, model_name, champion)
    twin = next((r.label for r in rows if r.run_id == source), "an earlier demo")
    rows.append(read_row(client, source, f"champion v{champion} = {twin}", searched))
    return rows


def _version_source(client: Any, model_name: str, version: str) -> str:
    """The training run a registered version comes from (a champion from an earlier demo)."""
    mv = client.get_model_version(model_name, version)
    return (mv.tags or {}).get("tpr.source_run_id") or mv.run_id


def _verdict(rows: list[Row], p_base: Any, p_sweep: Any) -> str:
    if p_sweep is None:
        return "No trial of the sweep finished, so there is no sweep best to compare with the baseline."
    best = next((r for r in rows if r.run_id == p_sweep.source_run_id), None)
    return verdict(
        base_val=p_base.challenger_metrics["R1"], best_val=p_sweep.challenger_metrics["R1"],
        best_label=best.label if best else f"run {p_sweep.source_run_id}", promoted=p_sweep.promoted,
        gate_reason=p_sweep.reason, base_test=rows[0].test.get("R1"),
        best_test=best.test.get("R1") if best else None,
    )
