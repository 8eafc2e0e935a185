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


def _dataset_schema():
    """The prepared dataset's columns as an MLflow schema (what the UI lists for the dataset)."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema

    from tpr_core.data.store import SCHEMA

    kinds = {pa.string(): DataType.string, pa.int64(): DataType.long, pa.int32(): DataType.integer,
             pa.binary(): DataType.binary}  # fmt: skip
    return Schema([ColSpec(kinds[f.type], f.name) for f in SCHEMA])


DATASET_DIGEST_CHARS = 12  # of the manifest's content hash; MLflow keeps digests short (at most 36)


def prepared_dataset(root: str, manifest: Mapping[str, Any], name: str) -> Any:
    """The prepared dataset at ``root`` as an ``mlflow.data`` dataset: its name, a digest (the
    first hex digits of the manifest's content hash), its source (the folder or URI), the Parquet
    columns, and the split counts as its profile. Nothing is read but the manifest."""
    import json
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    counts = dict(manifest.get("counts", {}))

    class PreparedDataset(MetaDataset):
        @property
        def profile(self) -> Any:
            return counts

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(counts)}

    digest = str(manifest.get("content_hash", "")).split(":", 1)[-1][:DATASET_DIGEST_CHARS] or None
    with warnings.catch_warnings():  # a local folder matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(root))
    return PreparedDataset(source, name=name, digest=digest, schema=_dataset_schema())


def log_dataset_input(run_id: str, dataset: Any, context: str = "train") -> None:
    """Log ``dataset`` (an ``mlflow.data`` dataset) as an input of the run; logging the same
    dataset again (a resumed run) adds nothing."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = _client()
    known = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    if (dataset.name, dataset.digest) in known:
        return
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    client.log_inputs(run_id, datasets=[entry])


def find_logged_model(run_id: str, name: str) -> str | None:
    """The id of the newest model named ``name`` that run ``run_id`` logged, or None."""
    client = _client()
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return found[0].model_id if found else None


def log_folder_model(
    run_id: str,
    folder: str | Path,
    name: str,
    metrics: list[tuple[Mapping[str, float], int]],
    dataset: Any = None,
    tags: Mapping[str, str] | None = None,
    model_type: str | None = None,
) -> str:
    """Log a folder as an MLflow 3 logged model of the run, with metrics linked to it.

    The model takes the run's params (as MLflow's own ``log_model`` does), ``tags`` and the
    folder's files, and becomes an output of the run; each ``(values, step)`` of ``metrics`` is
    logged on the run at ``step``, linked to the model and to ``dataset`` (the data they were
    measured on). A run that already logged a model of that name (a resumed finish) updates it.

    Returns:
        The model id (its URI is ``models:/<model_id>``).
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = _client()
    run = client.get_run(run_id)
    model_id = find_logged_model(run_id, name)
    created = model_id is None
    if created:
        model_id = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
            params=dict(run.data.params), tags={str(k): str(v) for k, v in (tags or {}).items()},
            model_type=model_type,
        ).model_id
    client.log_model_artifacts(model_id, str(folder))
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    if created:  # the run lists it among its outputs, once
        last_step = max((step for _, step in metrics), default=0)
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=last_step)])
    for values, step in metrics:
        link_model_metrics(run_id, model_id, values, step, dataset)
    return model_id


def link_model_metrics(
    run_id: str, model_id: str, metrics: Mapping[str, float], step: int, dataset: Any = None
) -> None:
    """Log metrics on the run at ``step``, linked to logged model ``model_id`` and, when given, to
    ``dataset`` (an ``mlflow.data`` dataset: the data they were measured on)."""
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    ts = int(time.time() * 1000)
    linked = dict(dataset_name=dataset.name, dataset_digest=dataset.digest) if dataset is not None else {}
    batch = [Metric(str(k), float(v), ts, int(step), model_id=model_id, run_id=run_id, **linked)
             for k, v in metrics.items()]  # fmt: skip
    client = _client()
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH], synchronous=True)
