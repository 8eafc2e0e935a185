"""What the registry holds, for ``tpr models``: registered models with their aliases, and one
model's versions with where they come from and what the gate decided (read-only)."""

from __future__ import annotations

from typing import Any

from pipelines.registry.common import GATE_R1_TAG, GATE_SPLIT_TAG, LOCK_SUFFIX, RegistryError, mlflow_client


def _aliases_by_version(aliases: dict[str, str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in sorted((aliases or {}).items()):
        out.setdefault(str(version), []).append(alias)
    return out


def list_models() -> list[dict[str, Any]]:
    """Every registered model (promotion locks left out), by name: ``name``, ``versions`` (the
    latest version number), ``aliases`` (``{alias: version}``)."""
    client = mlflow_client()
    rows = []
    for rm in client.search_registered_models(max_results=1000):
        if rm.name.endswith(LOCK_SUFFIX):
            continue
        latest = max((int(v.version) for v in rm.latest_versions or []), default=0)
        rows.append({"name": rm.name, "versions": latest, "aliases": dict(rm.aliases or {})})
    return sorted(rows, key=lambda r: r["name"])


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """The versions of ``model_name``, newest first: ``version``, ``aliases`` (list), ``decision``,
    ``split`` and ``r1`` (the gate's split and the version's R@1 on it), ``source_run_id``.

    Raises:
        RegistryError: No registered model has that name.
    """
    from mlflow.exceptions import MlflowException

    if "'" in model_name or model_name.endswith(LOCK_SUFFIX):
        raise RegistryError(f"{model_name!r} is not a registered model name tpr uses")
    client = mlflow_client()
    try:
        rm = client.get_registered_model(model_name)
    except MlflowException:
        raise RegistryError(f"no registered model named {model_name!r}; `tpr models` lists them") from None
    by_version = _aliases_by_version(rm.aliases)
    rows = []
    for mv in client.search_model_versions(f"name='{model_name}'", max_results=10000):
        tags = mv.tags or {}
        r1 = tags.get(GATE_R1_TAG)
        rows.append({
            "version": int(mv.version),
            "aliases": by_version.get(str(mv.version), []),
            "decision": tags.get("tpr.decision", ""),
            "split": tags.get(GATE_SPLIT_TAG, ""),
            "r1": float(r1) if r1 else None,
            "source_run_id": tags.get("tpr.source_run_id", mv.run_id or ""),
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["version"])
