"""``tpr sweep``: Ray Tune over a search space, every trial a distributed training.

Each trial is a Tune *function* trainable that builds and fits the same TorchTrainer as
``tpr train`` (``pipelines.train.fit``); a ``TuneReportCallback`` forwards each training
report to Tune, where the searcher (Optuna TPE or random) and ASHA see it.

Names are deterministic: the sweep ``NAME`` has its Tune experiment at
``RUNS/tune/NAME`` and each trial trains as the Ray Train run ``NAME-t<trial id>`` (Tune keeps
trial ids across ``--resume``). MLflow: one parent run keyed
``sweep:NAME``; each trial a child run keyed by its training run name, so a resumed
sweep never creates a run twice.

Conventions the registry reads (``pipelines.registry``): the parent run carries the tag
``tpr.best_trial_run_id`` (the best child's MLflow run id) and the best trial's exported
model under the artifact path ``model/``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import terminal
from pipelines.env import scoped_env
from pipelines.job import WorkerJob
from pipelines.setup import git_commit, init_ray, run_paths
from pipelines.space import SpaceFile, load_space, trial_config, tune_distributions
from pipelines.storage import exists, is_uri, local_dir
from pipelines.tracking import BEST_TRIAL_TAG
from tpr_core.config import ConfigError, ExperimentConfig

SWEEP_KEY_PREFIX = "sweep:"
# The trial driver only waits on its TorchTrainer: it reserves a little memory and no CPU, so
# that N trials of W workers fit exactly on N x W CPUs (a CPU share per driver would leave
# the last trial's worker group a fraction short of its CPU, waiting forever).
# It also stays on the head node (a sliver of the head's own resource): a lost worker node
# then costs its trials' worker groups, which Ray Train restarts from the last checkpoint,
# not their drivers (a lost driver would fail the whole trial).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2, "node:__internal_head__": 0.001}


def default_max_concurrent(cfg: ExperimentConfig) -> int:
    """Trials the cluster can hold at once: CPUs (or GPUs) / what one trial's workers take."""
    import ray

    res = ray.cluster_resources()
    d = cfg.distributed
    if d.use_gpu:
        return max(1, int(res.get("GPU", 1) // d.num_workers))
    per_trial = d.num_workers * d.cpus_per_worker
    return max(1, int(res.get("CPU", 1) // per_trial))


def _trial_key(trial_id: str) -> str:
    """Tune's trial id (kept across ``Tuner.restore``) made safe for a run name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", trial_id)


def trial_job(
    job: WorkerJob, sweep_name: str, parent_run_id: str | None, tracking_uri: str | None, params: dict[str, Any],
    source_tags: dict[str, str] | None = None,
) -> WorkerJob:
    """A trial's job: the one ``prepare_run`` built for the trial, a child of the sweep's MLflow
    run, tagged with the sweep's name, the trial's params and MLflow's source tags of the sweep's
    driver (``source_tags``: a trial runs in a Ray worker)."""
    return replace(
        job,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        extra_tags={**(source_tags or {}), "tpr.sweep": sweep_name,
                    "tpr.trial_params": json.dumps(params, sort_keys=True)},  # fmt: skip
    )


def _make_trainable(
    base: ExperimentConfig, runs_dir: str, sweep_name: str, parent_run_id: str | None, tracking_uri: str | None,
    source_tags: dict[str, str] | None = None,
):
    """The Tune function trainable, with the driver resources of a trial (closes over the
    base config and plain values, so it pickles)."""
    from ray import tune

    def trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from pipelines.train import end_failed_run, fit, prepare_run

        name = f"{sweep_name}-t{_trial_key(tune.get_context().get_trial_id())}"
        paths, job = prepare_run(trial_config(base, params), runs_dir, name)
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        job = trial_job(job, sweep_name, parent_run_id, tracking_uri, params, source_tags)
        try:
            fit(paths, job, callbacks=[TuneReportCallback()])
        except Exception as e:
            end_failed_run(job, e)
            raise

    return tune.with_resources(trial, TRIAL_DRIVER_RESOURCES)


def sweep(
    cfg: ExperimentConfig,
    space_path: str | Path,
    runs_dir: str | Path = "runs",
    samples: int | None = None,
    max_concurrent: int | None = None,
    name: str | None = None,
    resume: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the best trial's config, metric and MLflow ids."""
    from pipelines import tracking
    from pipelines.setup import absolutize, ensure_dataset, preflight
    from pipelines.tracking_server import tracking_server

    space = load_space(space_path, cfg)  # errors here: nothing started
    cfg = absolutize(cfg)
    preflight(cfg)
    ensure_dataset(cfg)  # generate/prepare once, before trials race for it
    name = name or f"sweep-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = run_paths(runs_dir, name)
    tune_storage = paths.storage.rsplit("/", 1)[0] + "/tune"
    exp_dir = f"{tune_storage}/{name}"
    n = samples or space.samples
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(exp_dir):
            raise ConfigError(f"no sweep named {name!r} to resume at {exp_dir}")

    # Ray starts while the MLflow server boots; trials get the URI from the trainable's closure.
    with tracking_server(paths.runs_dir, while_starting=init_ray) as tracking_uri:
        source_tags = tracking.context_tags(git_commit())
        parent = _start_parent(cfg, space, space_path, name, n, source_tags)
        trial_runs_dir = str(runs_dir if is_uri(runs_dir) else paths.runs_dir)
        trainable = _make_trainable(cfg, trial_runs_dir, name, parent, tracking_uri, source_tags)
        if resume:
            tuner = _restored_tuner(exp_dir, trainable)
        else:
            tuner = _new_tuner(cfg, space, trainable, name, tune_storage, n, max_concurrent, seed)
        # Tune adds a TensorBoard logger of its own (and prints how to open it); the trial
        # results tpr reads come from the CSV and JSON loggers _new_tuner names.
        with scoped_env(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
            grid = tuner.fit()
        summary = _log_parent(grid, space, parent, cfg, name, runs_dir=paths.runs_dir)
        tracking.set_terminated(parent, "FINISHED")
    summary["parent_run_id"] = parent
    summary["sweep_name"] = name
    return summary


def _start_parent(
    cfg: ExperimentConfig, space: SpaceFile, space_path: str | Path, name: str, samples: int,
    source_tags: dict[str, str],
) -> str:
    """Start (or find again, on a resume) the sweep's parent MLflow run and log the space and
    the base config; returns its id."""
    from pipelines import tracking

    parent = tracking.start_or_resume_run(
        cfg.tracking.experiment, run_key=SWEEP_KEY_PREFIX + name, run_name=name,
        tags={**source_tags, "tpr.kind": "sweep", "method": cfg.method},
    )
    tracking.describe(parent, (
        f"Sweep {name}: {samples} {cfg.method.upper()} trials from {space_path}, {space.search} search, "
        f"scheduler {space.scheduler.type}, optimising {space.metric} ({space.mode}). Each trial is a child run."
    ))
    tracking.log_params_flat(parent, {
        "space.file": str(space_path), "space.metric": space.metric, "space.mode": space.mode,
        "space.search": space.search, "space.samples": samples,
        "space.scheduler": space.scheduler.model_dump_json(),
        **{f"space.params.{k}": json.dumps(v) for k, v in space.params.items()},
    })
    try:  # the base config of every trial; a resume must repeat it (MLflow params are immutable)
        tracking.log_params_flat(parent, {"base": cfg.model_dump(mode="json")})
    except ValueError as e:
        raise ConfigError(
            f"sweep {name!r} was started with another base config; --resume needs the same "
            f"config file and key=value overrides ({e})"
        ) from None
    return parent


def _restored_tuner(exp_dir: str, trainable: Any) -> Any:
    """The Tuner of an interrupted sweep, continuing its unfinished and errored trials."""
    from ray.tune import Tuner

    return Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)


def _new_tuner(
    cfg: ExperimentConfig, space: SpaceFile, trainable: Any, name: str, tune_storage: str,
    samples: int, max_concurrent: int | None, seed: int,
) -> Any:
    """A Tuner of ``samples`` trials: the space's searcher and scheduler, as many trials at once
    as the cluster holds (or ``max_concurrent``)."""
    from ray import tune
    from ray.tune import TuneConfig
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Slots: what the cluster holds in trials of W workers. A trial stopped by ASHA has its
    # controller killed with it; Ray Train's placement-group cleaner (it needs the dashboard's
    # state API, part of ray[default]) then frees its workers for the next trial.
    concurrency = max_concurrent or default_max_concurrent(cfg)
    # The trial table (state, searched params, iteration, epoch, the space's metric) is
    # Tune's own live output. The searcher alone limits the trials at once (Tune's
    # max_concurrent_trials would be a second limit, and it warns that it ignores it).
    return tune.Tuner(
        trainable,
        param_space=tune_distributions(space),
        tune_config=TuneConfig(
            metric=space.metric, mode=space.mode, search_alg=_searcher(space, concurrency, seed),
            scheduler=_scheduler(cfg, space), num_samples=samples,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=tune_storage, verbose=terminal.tune_verbosity(),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
        ),
    )


def _searcher(space: SpaceFile, concurrency: int, seed: int) -> Any:
    """Optuna TPE (limited to ``concurrency`` trials at once) or random search, seeded."""
    if space.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        terminal.quiet_optuna()
        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


def _scheduler(cfg: ExperimentConfig, space: SpaceFile) -> Any:
    """ASHA over epochs, or FIFO (every trial runs to the end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.type != "asha":
        return FIFOScheduler()
    # One report per epoch; the last epoch's carries the final results (test metrics,
    # export), so a trial's last iteration is its epoch count.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


def _log_parent(grid: Any, space: SpaceFile, parent: str, cfg: ExperimentConfig, name: str, runs_dir: Path) -> dict:
    """Best config and metric, a CSV of all trials and a metric-vs-parameter picture."""
    from pipelines import tracking

    rows = []
    best: dict[str, Any] | None = None  # a space's metric is the running best val R@1, mode max
    for res in grid:
        params = dict(res.config or {})
        hist = res.metrics_dataframe
        values = []
        if hist is not None and space.metric in hist:
            values = [v for v in hist[space.metric].tolist() if v == v]  # drop NaN
        score = max(values) if values else None
        last = res.metrics or {}
        finished = "test/R1" in last  # the final report (test metrics + exported model)
        status = "ERROR" if res.error else ("DONE" if finished else "STOPPED")
        row = {
            "trial": Path(getattr(res, "path", "") or "").name, "status": status,
            space.metric: score, "epochs": int(hist["epoch"].max()) if hist is not None and "epoch" in hist else None,
            "test/R1": last.get("test/R1"),
            # a trial ASHA stopped never sent its final report: find its child run by its key
            "mlflow_run_id": last.get("mlflow_run_id") or (
                tracking.find_run(cfg.tracking.experiment, f"{name}-t{_trial_key(last['trial_id'])}")
                if last.get("trial_id") else None
            ) or "",
            **params,
        }
        rows.append(row)
        _end_trial_run(row, res.error, space)
        # Only a trial that ran to the end has an exported model to promote.
        if finished and score is not None and (best is None or score > best["score"]):
            best = {"score": score, "params": params, "row": row}
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp, "trials.csv")
        keys = sorted({k for r in rows for k in r})
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        tracking.log_artifact(parent, csv_path)
        try:
            png = _metric_vs_params(rows, space, Path(tmp, "metric_vs_params.png"))
            tracking.log_artifact(parent, png, "pictures")
        except Exception as e:  # a picture must not fail a finished sweep
            print(f"[tpr] warning: could not draw the sweep picture: {e}")
    out: dict[str, Any] = {"trials": rows, "metric": space.metric}
    if best is None:
        return out
    best_cfg = trial_config(cfg, best["params"])
    out.update(best_metric=best["score"], best_params=best["params"], best_config=best_cfg.model_dump(mode="json"))
    child = best["row"]["mlflow_run_id"] or _find_child_run(cfg.tracking.experiment, parent, best["params"])
    metrics = {"best/val/R1": float(best["score"])}  # the parent run's MLflow key
    tracking.log_metrics(parent, metrics, step=0)
    tracking.log_params_flat(parent, {f"best.{k}": v for k, v in best["params"].items()})
    if child:
        from mlflow import MlflowClient

        client = MlflowClient()
        client.set_tag(parent, BEST_TRIAL_TAG, child)
        out["best_trial_run_id"] = child
        run = client.get_run(child)
        model_dir = _model_dir_of(run)
        if model_dir and exists(model_dir):
            tracking.log_artifact(parent, local_dir(model_dir), "model")
            out["best_model_dir"] = model_dir
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp, "best_config.yaml")
        from tpr_core.config import dump_config

        p.write_text(dump_config(best_cfg))
        tracking.log_artifact(parent, p)
    return out


def _end_trial_run(row: dict[str, Any], error: BaseException | None, space: SpaceFile) -> None:
    """Give a trial's MLflow run its real end: a trial the scheduler stopped, or one that failed,
    never reached the end of its training, which ends the runs of finished trials."""
    from pipelines import tracking

    if not row["mlflow_run_id"] or row["status"] == "DONE":
        return
    if row["status"] == "ERROR":
        tracking.end_if_running(row["mlflow_run_id"], "FAILED", tracking.failure_note(error))
        return
    # Without a scheduler, only an interrupted sweep leaves a trial unfinished (a resume goes on).
    who = "by the ASHA scheduler" if space.scheduler.type == "asha" else "when the sweep ended"
    score = row.get("best_" + space.metric)
    tracking.end_if_running(
        row["mlflow_run_id"], "KILLED",
        f"Stopped {who} after epoch {row['epochs']} (best {space.metric} {score}).",
    )


def _find_child_run(experiment: str, parent: str, params: dict[str, Any]) -> str | None:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    want = json.dumps(params, sort_keys=True)
    for r in runs:
        if r.data.tags.get("tpr.trial_params") == want:
            return r.info.run_id
    return None


def _model_dir_of(run: Any) -> str | None:
    return run.data.tags.get("tpr.model_dir")


def _metric_vs_params(rows: list[dict], space: SpaceFile, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space.params)
    mkey = space.metric
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = [(r.get(k), r.get(mkey)) for r in rows if r.get(mkey) is not None]
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        if xs and isinstance(xs[0], str):
            cats = sorted(set(xs))
            xs = [cats.index(x) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        ax.scatter(xs, ys)
        ax.set_xlabel(k)
        ax.set_ylabel(space.metric)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
