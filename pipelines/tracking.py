"""MLflow run logging for the training side: experiments, runs, params, metrics, artifacts, tags.

The embedded tracking server these helpers talk to (when ``MLFLOW_TRACKING_URI`` names no shared
one) is :mod:`pipelines.tracking_server`.

Rank 0 only. A run is identified by the tag ``tpr.run_key``: :func:`start_or_resume_run`
finds the run carrying the key, so a restarted worker group or a resumed command continues
the same MLflow run instead of opening a second one. Metrics are logged with explicit steps
(:func:`log_metrics`); after a restart the caller asks :func:`last_logged_step` and skips
the steps that are already there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_KEY_TAG = "tpr.run_key"
PARENT_RUN_TAG = "mlflow.parentRunId"
BEST_TRIAL_TAG = "tpr.best_trial_run_id"  # on a sweep's parent run: the run id of its best trial
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows (and edits) as a run's description
# MLflow 3 tells model development from GenAI work by this experiment tag; MLflow's own tools
# (and later UIs) read it. The 3.17 UI picks its view from a URL parameter: see ui_url.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def get_or_create_experiment(name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when two callers race)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # Someone else created it between our look-up and our create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older tpr, or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def context_tags(git_commit: str | None = None) -> dict[str, str]:
    """The source tags MLflow's own context providers give this process (``mlflow.user``,
    ``mlflow.source.name``/``type``, ``mlflow.source.git.*`` when the entry point lives in a git
    checkout), for a run created elsewhere: Ray workers run Ray's entry point, not the user's.

    ``git_commit`` fills ``mlflow.source.git.commit`` when MLflow's git provider found none
    (``python -c``, a console script outside the checkout).
    """
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {k: str(v) for k, v in resolve_tags().items() if k.startswith(("mlflow.source.", "mlflow.user"))}
    if git_commit and git_commit != "unknown":
        tags.setdefault(MLFLOW_GIT_COMMIT, git_commit)
    return tags


def _check_key(run_key: str) -> None:
    if not run_key or "'" in run_key or '"' in run_key or "\\" in run_key:
        raise ValueError(f"run_key {run_key!r} must be non-empty and free of quotes and backslashes")


def find_run(experiment: str, run_key: str) -> str | None:
    """The id of the oldest live run of ``experiment`` tagged ``tpr.run_key == run_key``, if any."""
    _check_key(run_key)
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=100
    )
    if not runs:
        return None
    # Oldest first, id as tie-break, so that every caller picks the same run.
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def start_or_resume_run(
    experiment: str,
    run_key: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Continue the run tagged ``tpr.run_key == run_key`` in ``experiment``, or create it.

    A resumed run is set back to ``RUNNING``. Should two callers create the same key at once,
    both converge on the oldest run and the newer duplicate is deleted.

    Args:
        experiment: Experiment name (created if missing).
        run_key: Stable identity of the training (e.g. the Ray run name); no quotes.
        run_name: Display name of a new run.
        tags: Extra tags for a new run (also set again on a resumed one).
        parent_run_id: Makes the new run a child (``mlflow.parentRunId``) of this run.

    Returns:
        The run id.
    """
    client = _client()
    exp_id = get_or_create_experiment(experiment)
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    found = find_run(experiment, run_key)
    if found is not None:
        run = client.get_run(found)
        if run.info.status != "RUNNING":
            client.update_run(found, status="RUNNING")
        for k, v in all_tags.items():
            if run.data.tags.get(k) != v:
                client.set_tag(found, k, v)
        return found
    all_tags[RUN_KEY_TAG] = run_key
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    winner = find_run(experiment, run_key)
    if winner is not None and winner != run.info.run_id:
        client.delete_run(run.info.run_id)
        return winner
    return run.info.run_id


def _param_value(value: Any) -> str:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        # MLflow refuses longer values; keep the head and say that it was cut.
        marker = "...[truncated]"
        text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return text


def log_params_flat(run_id: str, params: Mapping[str, Any]) -> int:
    """Log a (possibly nested) parameter dict as dotted keys, idempotently.

    Nested dicts are flattened (``{"loss": {"weights": {"id": 1}}}`` -> ``loss.weights.id``).
    Values are stringified and cut to MLflow's length limit. Parameters already logged on the
    run with the same value are skipped, so a resumed run can log its config again.

    Args:
        run_id: Target run.
        params: Parameters (nested or dotted).

    Returns:
        The number of parameters actually sent.

    Raises:
        ValueError: A parameter is already logged with a different value (MLflow forbids the
            change); the message names the key and both values.
    """
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

    from tpr_core.config import flatten

    client = _client()
    existing = client.get_run(run_id).data.params
    todo: list[Param] = []
    for key, value in flatten(dict(params)).items():
        text = _param_value(value)
        old = existing.get(key)
        if old is None:
            todo.append(Param(key, text))
        elif old != text:
            raise ValueError(
                f"run {run_id}: param {key!r} is already logged as {old!r}; cannot change it to {text!r} "
                "(a resumed run must keep its config; start a new run key instead)"
            )
    for i in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=todo[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
    return len(todo)


def log_metrics(
    run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None
) -> None:
    """Log scalar metrics at an explicit step through ``log_batch`` (one request per 1000 values).

    Args:
        run_id: Target run.
        metrics: Metric key -> value (e.g. ``{"train/loss": 1.2, "val/R1": 43.0}``).
        step: The step all values belong to (the caller owns the step counter).
        timestamp_ms: Wall-clock time of the values; now when omitted.
    """
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    batch = [Metric(str(k), float(v), ts, int(step)) for k, v in metrics.items()]
    client = _client()
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH], synchronous=True)


def last_logged_step(run_id: str, key: str) -> int | None:
    """The largest step at which ``key`` was logged on the run, or None if never."""
    history = _client().get_metric_history(run_id, key)
    return max((m.step for m in history), default=None)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file, or a folder's contents, under ``artifact_path`` of the run."""
    path = Path(path)
    client = _client()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"artifact to log not found: {path}")


def describe(run_id: str, text: str) -> None:
    """Set the run's description (the UI's "Description" box, ``mlflow.note.content``)."""
    _client().set_tag(run_id, DESCRIPTION_TAG, text)


def set_terminated(run_id: str, status: str = "FINISHED", note: str | None = None) -> None:
    """End a run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``); the end time is now.

    ``note`` is appended to the run's description (why it failed or was stopped).
    """
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    client = _client()
    if note:
        old = client.get_run(run_id).data.tags.get(DESCRIPTION_TAG, "").rstrip()
        client.set_tag(run_id, DESCRIPTION_TAG, f"{old}\n\n{note}".strip())
    client.set_terminated(run_id, status=status)


def end_if_running(run_id: str, status: str, note: str | None = None) -> bool:
    """End the run with ``status`` if it is still ``RUNNING`` (its process died, or was stopped,
    before it could end it); returns whether it did."""
    if _client().get_run(run_id).info.status != "RUNNING":
        return False
    set_terminated(run_id, status, note)
    return True


def end_open_run(experiment: str, run_key: str, status: str, note: str | None = None) -> str | None:
    """:func:`end_if_running` for the run keyed ``run_key``; returns its id, or None when there is none."""
    run_id = find_run(experiment, run_key)
    if run_id is not None:
        end_if_running(run_id, status, note)
    return run_id


def failure_note(error: BaseException, limit: int = 2000) -> str:
    """A run description line for ``error``: its type and message, the middle cut when long
    (Ray's messages carry the worker's traceback, whose end names the cause)."""
    text = f"{type(error).__name__}: {error}".strip()
    if len(text) > limit:
        text = text[: limit // 5] + "\n[...]\n" + text[-(limit - limit // 5) :]
    return f"Failed: {text}"


def ui_url(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None,
           model_name: str | None = None) -> str:
    """The MLflow UI page of an experiment (its runs table), a run, or a registered model.

    The MLflow 3.17 UI opens an experiment in its GenAI view (traces, no model registry link)
    unless the URL says ``workflowType=machine_learning``; it does not read the experiment's
    ``mlflow.experimentKind`` tag for this.
    """
    base = tracking_uri.rstrip("/")
    query = "?workflowType=machine_learning"
    if model_name is not None:
        from urllib.parse import quote

        return f"{base}/#/models/{quote(model_name, safe='')}{query}"
    if experiment_id is None:
        return f"{base}/#/experiments{query}"
    if run_id is not None:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{query}"
    return f"{base}/#/experiments/{experiment_id}/runs{query}"
