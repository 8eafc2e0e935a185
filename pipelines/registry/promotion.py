"""Promotion and rollback: a new version becomes champion only when it is better.

Aliases and the gate
    Each promotion registers a new version from a retrieval pyfunc logged from the training run
    itself (see :mod:`pipelines.registry.artifacts`), so the version's source run is the run
    that trained it; the gate's evaluation is linked to that logged model as ``gate/<split>/<metric>``.
    Version tags, few on purpose: ``tpr.weights_sha256`` (checked by every load),
    ``tpr.source_run_id``, ``tpr.method``, ``tpr.dataset_manifest_hash``, then the decision
    (below); the numbers are in the version's description.

    The new version becomes ``challenger``. Challenger and ``champion`` are both evaluated on
    the same split of the same prepared dataset; ``champion`` moves to the challenger only if
    its R@1 exceeds the champion's by more than ``margin`` points (a tie keeps the champion),
    and the replaced champion becomes ``previous-champion``. The first version of a model
    becomes champion. The decision, its reason and the compared version are written on the new
    version as ``tpr.decision``, ``tpr.decision_reason``, ``tpr.compared_with`` (tags), and with
    both metric sets in its description. A promoted version also records ``tpr.promoted_over``
    (the version it replaced), which is what :func:`rollback` follows.

    Every alias read and write happens under the :class:`~pipelines.registry.lock.PromotionLock`.

    Exit codes of ``tpr promote``: 0 promoted, :data:`EXIT_KEPT` (3) kept.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.registry.artifacts import (
    download_registered_model,
    download_run_model,
    exported_dir_of,
    log_registered_model,
    resolve_source_run,
    run_model_uri,
)
from pipelines.registry.common import (
    CHALLENGER,
    CHAMPION,
    EXIT_KEPT,
    EXIT_PROMOTED,
    GATE_METRIC,
    GATE_R1_TAG,
    GATE_SPLIT_TAG,
    PREVIOUS,
    WEIGHTS_TAG,
    RegistryError,
    has_error_code,
    mlflow_client,
    sha256_file,
    torch_device,
)
from pipelines.registry.evaluation import EvalOutcome, evaluate_exported
from pipelines.registry.lock import PromotionLock
from pipelines.terminal import mlflow_prints_off
from tpr_core.eval.metrics import REPORTED_METRICS


@dataclass
class PromotionResult:
    """Outcome of :func:`promote`.

    Attributes:
        model_name: registered model.
        version: the new version (now ``challenger``).
        decision: ``promoted`` or ``kept``.
        reason: one sentence why.
        split: evaluation split.
        challenger_metrics: metrics of the new version on ``split``.
        champion_metrics: metrics of the champion it was compared with (None for the first version).
        compared_with: that champion's version (None for the first version).
        champion: the champion version after the decision.
        source_run_id: the training run the version comes from.
        model_uri: ``models:/NAME/VERSION``.
    """

    model_name: str
    version: str
    decision: str
    reason: str
    split: str
    challenger_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    compared_with: str | None
    champion: str
    source_run_id: str
    model_uri: str

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    @property
    def exit_code(self) -> int:
        """0 when promoted, :data:`EXIT_KEPT` when the champion was kept."""
        return EXIT_PROMOTED if self.promoted else EXIT_KEPT


@dataclass
class RollbackResult:
    """Outcome of :func:`rollback`: champion went from ``from_version`` to ``to_version``."""

    model_name: str
    from_version: str | None
    to_version: str
    previous_champion: str | None


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if has_error_code(e, "RESOURCE_DOES_NOT_EXIST") or has_error_code(e, "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _fmt(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in REPORTED_METRICS if k in metrics)


def _eval_version(name: str, version: str, data_root: str, split: str, split_data: Any) -> dict[str, float]:
    from tpr_core.export import load_exported

    with tempfile.TemporaryDirectory(prefix="tpr-champion-") as tmp:
        local = download_registered_model(f"models:/{name}/{version}", tmp)
        exported = load_exported(exported_dir_of(local), device=torch_device())
        return evaluate_exported(exported, data_root, split, split_data=split_data).metrics


def gate_decision(
    challenger_r1: float,
    champion_r1: float | None,
    margin: float,
    split: str = "val",
    champion: str | None = None,
) -> tuple[str, str]:
    """The promotion gate: ``("promoted" | "kept", reason)``.

    Promoted when there is no champion, or when ``challenger_r1 > champion_r1 + margin``
    (strictly: a tie, or a gain of exactly ``margin``, keeps the champion).
    """
    if champion_r1 is None:
        return "promoted", "first version of the model"
    who = f"champion v{champion}" if champion else "champion"
    if challenger_r1 > champion_r1 + margin:
        return (
            "promoted",
            f"challenger {split}/R1 {challenger_r1:.2f} > {who} {champion_r1:.2f} + margin {margin:g}",
        )
    return "kept", f"challenger {split}/R1 {challenger_r1:.2f} <= {who} {champion_r1:.2f} + margin {margin:g}"


@dataclass
class _Challenger:
    """A newly registered version, before the gate.

    Attributes:
        version: its version number.
        source_run_id: the training run it comes from.
        model_id: the retrieval pyfunc logged from that run, which the version registers.
        evaluation: its metrics on the gate's split (with the split's data and root).
        trained_manifest: manifest hash of the dataset it was trained on ("" when unknown).
        reported: the numbers the training exported with the model (val/*, test/*, epoch, ...).
        git_commit: the code that trained it ("" when unknown).
        gallery: ``split of root``, the serving gallery.
    """

    version: str
    source_run_id: str
    model_id: str
    evaluation: EvalOutcome
    trained_manifest: str
    reported: dict[str, float]
    git_commit: str
    gallery: str

    def reported_r1(self, split: str) -> float | None:
        """The gate metric the training run reported on ``split``, if any."""
        return self.reported.get(f"{split}/{GATE_METRIC}")


@dataclass
class _Verdict:
    """What the gate decided, and against which champion (None: there was none)."""

    decision: str
    reason: str
    compared_with: str | None
    champion_metrics: dict[str, float] | None


def _version_tags(source: str, sweep_run_id: str | None, exported: Any, src_tags: dict) -> dict[str, str]:
    """The tags a new version carries: its weights' hash and where it comes from."""
    from tpr_core.export import WEIGHTS_FILE

    info_extra = exported.info.get("extra", {}) or {}
    manifest = (
        src_tags.get("dataset_manifest_hash")
        or exported.info.get("dataset_manifest_hash")
        or info_extra.get("manifest_hash")
        or ""
    )
    tags = {
        WEIGHTS_TAG: sha256_file(Path(exported.path) / WEIGHTS_FILE),
        "tpr.source_run_id": source,
        "tpr.method": exported.cfg.method,
        "tpr.dataset_manifest_hash": manifest,
    }
    if sweep_run_id:
        tags["tpr.sweep_run_id"] = sweep_run_id
    return tags


def _git_commit(exported: Any, src_tags: dict) -> str:
    info_extra = exported.info.get("extra", {}) or {}
    return src_tags.get("git_commit") or src_tags.get("mlflow.source.git.commit") or info_extra.get("git_commit", "")


_MODEL_DESCRIPTION = (
    "Text-based person retrieval: a text query ranks the gallery images by how well they match the "
    "described person. Each version is a retrieval pyfunc (exported weights, config, tokenizer and a "
    "gallery index) logged from the training run it comes from by `tpr promote`, which re-evaluates it "
    "on a frozen split before moving an alias. Aliases: champion (what is served), challenger (the "
    "latest candidate), previous-champion (what `tpr rollback` restores)."
)


def _describe_model(client: Any, model_name: str) -> None:
    """Give a registered model without a description the one above."""
    if not (client.get_registered_model(model_name).description or "").strip():
        client.update_registered_model(model_name, description=_MODEL_DESCRIPTION)


def _gate_dataset(exported: Any, root: str) -> Any:
    """The gate's evaluation data as an ``mlflow.data`` dataset (named as the training names it)."""
    from tpr_core.data.store import read_manifest

    manifest = read_manifest(root)
    name = exported.cfg.data.format if root == str(exported.cfg.data.root) else manifest["source_format"]
    return tracking.prepared_dataset(root, manifest, name)


def _register_challenger(
    client: Any,
    model_name: str,
    source: str,
    sweep_run_id: str | None,
    split: str,
    data_root: str | None,
    gallery_split: str,
) -> _Challenger:
    """Evaluate the source run's model on ``split``, log the retrieval pyfunc from the source run
    (the gate's metrics linked to it) and register it as a new version of ``model_name``."""
    import mlflow

    from tpr_core.data.dataset import load_split
    from tpr_core.export import load_exported

    src_run = client.get_run(source)
    with tempfile.TemporaryDirectory(prefix="tpr-promote-") as tmp:
        local = download_run_model(source, tmp)
        exported = load_exported(local, device=torch_device())
        root = str(data_root or exported.cfg.data.root)
        evaluation = evaluate_exported(exported, root, split, split_data=load_split(root, split))
        version_tags = _version_tags(source, sweep_run_id, exported, src_run.data.tags)
        uri = log_registered_model(local, root, gallery_split, run_id=source)
        model_id = uri.removeprefix("models:/")
        gate = {f"gate/{split}/{k}": evaluation.metrics[k] for k in REPORTED_METRICS}
        tracking.link_model_metrics(source, model_id, gate, step=0, dataset=_gate_dataset(exported, root))
        with mlflow_prints_off():  # "Successfully registered model", "Created version"
            mv = mlflow.register_model(uri, model_name, tags=version_tags)
        _describe_model(client, model_name)
    return _Challenger(
        version=str(mv.version),
        source_run_id=source,
        model_id=model_id,
        evaluation=evaluation,
        trained_manifest=version_tags["tpr.dataset_manifest_hash"],
        reported={k: float(v) for k, v in exported.metrics.items() if isinstance(v, (int, float))},
        git_commit=_git_commit(exported, src_run.data.tags),
        gallery=f"split {gallery_split!r} of {root}",
    )


def _decision_tags(verdict: _Verdict, split: str, r1: float) -> dict[str, str]:
    """The gate's tags on the new version: its decision, why, the champion it was compared with,
    and the split and R@1 it was judged on (``tpr models`` lists them)."""
    return {
        "tpr.decision": verdict.decision,
        "tpr.decision_reason": verdict.reason,
        "tpr.compared_with": verdict.compared_with or "",
        GATE_SPLIT_TAG: split,
        GATE_R1_TAG: f"{r1:.4f}",
    }


def _description(ch: _Challenger, verdict: _Verdict, split: str, margin: float) -> str:
    """The new version's description: the decision, both metric sets, where the version comes
    from, and any mismatch worth a look."""
    ev = ch.evaluation
    c1 = ev.metrics[GATE_METRIC]
    current = verdict.compared_with
    trained = ", ".join(
        f"{k} {ch.reported[k]:.2f}" for k in (f"{s}/{m}" for s in ("val", "test") for m in REPORTED_METRICS)
        if k in ch.reported
    )
    lines = [
        f"Decision: {verdict.decision} ({verdict.reason}).",
        f"Evaluated on split {split!r} of {ev.data_root} (manifest {ev.manifest_hash or 'unknown'}), "
        f"margin {margin:g} R1 points.",
        f"Challenger v{ch.version}: {_fmt(ev.metrics)}.",
        f"Champion v{current}: {_fmt(verdict.champion_metrics)}."
        if current
        else "No champion before this version.",
        f"Trained by run {ch.source_run_id} (code {ch.git_commit or 'unknown'}, dataset manifest "
        f"{ch.trained_manifest or 'unknown'}), which reported {trained or 'no metrics'}.",
        f"Logged model models:/{ch.model_id}; gallery: {ch.gallery}.",
    ]
    if ch.trained_manifest and ev.manifest_hash and ch.trained_manifest != ev.manifest_hash:
        lines.append(
            f"Note: trained on dataset manifest {ch.trained_manifest}, evaluated on {ev.manifest_hash}."
        )
    reported = ch.reported_r1(split)
    if reported is not None and abs(float(reported) - c1) > 0.5:
        lines.append(f"Warning: the run reported {split}/R1 {float(reported):.2f}; re-evaluation gives {c1:.2f}.")
    return "\n".join(lines)


def _judge(client: Any, model_name: str, ev: Any, margin: float, split: str) -> _Verdict:
    """The gate's verdict on an evaluated challenger: the current champion evaluated on the same
    split and data, then compared (the gate and ``promote --dry-run`` both decide here)."""
    current = _alias_version(client, model_name, CHAMPION)
    champion_metrics = None
    if current is not None:
        champion_metrics = _eval_version(model_name, current, ev.data_root, split, ev.split_data)
    decision, reason = gate_decision(
        ev.metrics[GATE_METRIC],
        None if champion_metrics is None else champion_metrics[GATE_METRIC],
        margin,
        split,
        current,
    )
    return _Verdict(decision, reason, current, champion_metrics)


def _gate(client: Any, model_name: str, ch: _Challenger, margin: float, split: str) -> tuple[_Verdict, str]:
    """Under the lock: make the version challenger, compare it with the champion, move the aliases.

    Returns:
        The verdict, and the champion version after it.
    """
    ev = ch.evaluation
    reject_interrupted(client, model_name)
    client.set_registered_model_alias(model_name, CHALLENGER, ch.version)
    verdict = _judge(client, model_name, ev, margin, split)
    decision, current = verdict.decision, verdict.compared_with
    tags = _decision_tags(verdict, split, ev.metrics[GATE_METRIC])
    if decision == "promoted":
        if current is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, current)
            tags["tpr.promoted_over"] = current
        client.set_registered_model_alias(model_name, CHAMPION, ch.version)
    for k, v in tags.items():
        client.set_model_version_tag(model_name, ch.version, k, v)
    client.update_model_version(model_name, ch.version, description=_description(ch, verdict, split, margin))
    return verdict, _alias_version(client, model_name, CHAMPION) or ch.version


def reject_interrupted(client: Any, model_name: str) -> str | None:
    """Under the lock: a version that holds ``challenger`` without a decision was being gated
    by a promotion that died (a live one holds the lock until its decision is written). Mark it
    rejected and take the alias off; returns its version, or None."""
    version = _alias_version(client, model_name, CHALLENGER)
    if version is None or client.get_model_version(model_name, version).tags.get("tpr.decision"):
        return None
    client.set_model_version_tag(model_name, version, "tpr.decision", "rejected")
    client.set_model_version_tag(
        model_name, version, "tpr.decision_reason", "its promotion stopped before the gate decided"
    )
    client.delete_registered_model_alias(model_name, CHALLENGER)
    print(f"[tpr] {model_name} v{version}: its promotion was interrupted; marked rejected", file=sys.stderr)
    return version


def promote(
    model_name: str,
    run_id: str | None = None,
    sweep_run_id: str | None = None,
    margin: float = 0.0,
    split: str = "val",
    data_root: str | None = None,
    gallery_split: str = "test",
    lock_timeout_s: float = 3600.0,
) -> PromotionResult:
    """Register the run's exported model as a new version and move ``champion`` only if it is better.

    Args:
        model_name: registered model name.
        run_id: the training run (its ``model/`` artifact is registered).
        sweep_run_id: or a sweep parent run (its ``tpr.best_trial_run_id`` is registered).
        margin: R@1 points the challenger must gain over the champion (strictly more).
        split: evaluation split of the gate (never select on test).
        data_root: prepared dataset; default the challenger's ``cfg.data.root``.
        gallery_split: split whose images form the serving model's gallery.
        lock_timeout_s: how long to wait for a concurrent promotion of the same model.

    Returns:
        A :class:`PromotionResult` (``exit_code`` 0 promoted, 3 kept).
    """
    client = mlflow_client()
    source = resolve_source_run(run_id, sweep_run_id)
    ch = _register_challenger(client, model_name, source, sweep_run_id, split, data_root, gallery_split)
    with PromotionLock(model_name, timeout_s=lock_timeout_s):
        verdict, champion_after = _gate(client, model_name, ch, margin, split)
    return PromotionResult(
        model_name=model_name,
        version=ch.version,
        decision=verdict.decision,
        reason=verdict.reason,
        split=split,
        challenger_metrics=ch.evaluation.metrics,
        champion_metrics=verdict.champion_metrics,
        compared_with=verdict.compared_with,
        champion=champion_after,
        source_run_id=source,
        model_uri=f"models:/{model_name}/{ch.version}",
    )


def rollback(model_name: str, lock_timeout_s: float = 3600.0) -> RollbackResult:
    """Move ``champion`` back to ``previous-champion``.

    ``previous-champion`` then moves one step further back (to the version the restored one
    had replaced, from its ``tpr.promoted_over`` tag), or is removed when there is none. The
    rollback is recorded on the restored version (tags ``tpr.rollback.*`` and description).

    Raises:
        RegistryError: the model has no ``previous-champion``.
    """
    client = mlflow_client()
    with PromotionLock(model_name, timeout_s=lock_timeout_s):
        reject_interrupted(client, model_name)
        prev = _alias_version(client, model_name, PREVIOUS)
        if prev is None:
            raise RegistryError(f"registered model {model_name!r} has no {PREVIOUS!r} alias to roll back to")
        current = _alias_version(client, model_name, CHAMPION)
        client.set_registered_model_alias(model_name, CHAMPION, prev)
        restored = client.get_model_version(model_name, prev)
        older = restored.tags.get("tpr.promoted_over")
        if older and older != prev:
            client.set_registered_model_alias(model_name, PREVIOUS, older)
        else:
            client.delete_registered_model_alias(model_name, PREVIOUS)
            older = None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        client.set_model_version_tag(model_name, prev, "tpr.decision", "rollback")
        client.set_model_version_tag(model_name, prev, "tpr.rollback.from_version", current or "")
        client.set_model_version_tag(model_name, prev, "tpr.rollback.at", stamp)
        if current:
            client.set_model_version_tag(model_name, current, "tpr.rolled_back", stamp)
        note = f"Rollback at {stamp}: champion moved back from v{current} to this version."
        desc = (restored.description or "").rstrip()
        client.update_model_version(model_name, prev, description=f"{desc}\n{note}".strip())
    return RollbackResult(model_name, current, prev, older)


def preview_promotion(
    model_name: str,
    run_id: str | None = None,
    sweep_run_id: str | None = None,
    margin: float = 0.0,
    split: str = "val",
    data_root: str | None = None,
) -> PromotionResult:
    """What :func:`promote` would decide now, changing nothing (``tpr promote --dry-run``).

    The source run's model and the current champion are evaluated on ``split`` as the gate
    would; nothing is registered, no alias or tag moves, no lock is taken (a concurrent
    promotion may change the champion in the meantime).

    Returns:
        A :class:`PromotionResult` without a version (``version`` ""); ``champion`` is the
        champion now, ``model_uri`` the source run's model.
    """
    from tpr_core.data.dataset import load_split
    from tpr_core.export import load_exported

    client = mlflow_client()
    source = resolve_source_run(run_id, sweep_run_id)
    with tempfile.TemporaryDirectory(prefix="tpr-promote-") as tmp:
        exported = load_exported(download_run_model(source, tmp), device=torch_device())
        root = str(data_root or exported.cfg.data.root)
        ev = evaluate_exported(exported, root, split, split_data=load_split(root, split))
    verdict = _judge(client, model_name, ev, margin, split)
    current = verdict.compared_with
    return PromotionResult(
        model_name=model_name, version="", decision=verdict.decision, reason=verdict.reason, split=split,
        challenger_metrics=ev.metrics, champion_metrics=verdict.champion_metrics, compared_with=current,
        champion=current or "", source_run_id=source, model_uri=run_model_uri(source),
    )  # fmt: skip
