"""Model registry: register a trained model, promote a champion only when it is better, roll back.

Conventions the training and sweep code follow
    - A training run logs its exported model folder (``tpr_core.export``) as the artifact
      directory ``model/`` of its MLflow run (``runs:/<run_id>/model``), and tags the run
      ``method``, ``dataset_manifest_hash`` and ``git_commit``.
    - A sweep's parent run carries the tag ``tpr.best_trial_run_id`` naming the MLflow run of
      its best trial (selected on the validation split).

Registered model
    Each promotion registers a new version: an MLflow pyfunc model defined from code
    (``pipelines/serving_model.py``) whose artifacts are the exported folder and a gallery
    index (Parquet embeddings of the gallery split, default ``test``). The pyfunc is logged
    in a registration run, a child of the source training run. Version tags:
    ``tpr.source_run_id``, ``tpr.method``, ``tpr.dataset_manifest_hash``, ``tpr.git_commit``,
    ``tpr.metric.<key>`` (the exported metrics), then the decision (below).

Aliases and the gate
    The new version becomes ``challenger``. Challenger and ``champion`` are both evaluated on
    the same split of the same prepared dataset; ``champion`` moves to the challenger only if
    its R@1 exceeds the champion's by more than ``margin`` points (a tie keeps the champion),
    and the replaced champion becomes ``previous-champion``. The first version of a model
    becomes champion. The decision, both metric sets and the compared version are written on
    the new version as ``tpr.decision``, ``tpr.challenger.<metric>``, ``tpr.champion.<metric>``,
    ``tpr.compared_with`` (tags) and in its description. A promoted version also records
    ``tpr.promoted_over`` (the version it replaced), which is what :func:`rollback` follows.

    Exit codes of ``tpr promote``: 0 promoted, :data:`EXIT_KEPT` (3) kept.

Concurrency: a lock, not a tag compare-and-set
    Tag writes are last-writer-wins in MLflow, so a tag "compare-and-set" needs a settle delay
    and re-read and is still only probabilistic. The store does have one atomic primitive that
    works the same against a remote server: creating a registered model whose name already
    exists fails (unique key). Promotions and rollbacks therefore hold a lock that *is* a
    registered model, ``<name>.promotion-lock``, created to acquire and deleted to release;
    every alias read and write happens under it. A lock older than its TTL (its creation
    timestamp, on the server's clock, plus ``ttl_s``) is considered abandoned by a crashed
    holder and is broken. While held it is visible in the registry's model list.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.tracking import BEST_TRIAL_TAG
from tpr_core.eval.metrics import REPORTED_METRICS

MODEL_ARTIFACT_PATH = "model"
SERVING_MODEL_NAME = "retrieval_model"

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"

EXIT_PROMOTED = 0
EXIT_KEPT = 3

LOCK_SUFFIX = ".promotion-lock"
GATE_METRIC = "R1"
SERVING_FILE = Path(__file__).with_name("serving_model.py")


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says what is missing."""


class PromotionLockTimeout(RegistryError):
    """The promotion lock stayed held by someone else for longer than the timeout."""


# --------------------------------------------------------------------------- results


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


@dataclass
class EvalOutcome:
    """Metrics of an exported model on one split, and what is needed to draw them."""

    metrics: dict[str, float]
    result: Any  # tpr_core.eval.EvalResult
    split_data: Any  # tpr_core.data.dataset.SplitData
    data_root: str
    manifest_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _is_code(err: Exception, code: str) -> bool:
    return getattr(err, "error_code", None) == code


def _manifest_hash(data_root: str) -> str | None:
    from tpr_core.data.parquet_io import read_manifest

    try:
        return str(read_manifest(data_root).get("content_hash"))
    except Exception:  # a root without a manifest is reported by load_split with a clearer message
        return None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_source_run(run_id: str | None = None, sweep_run_id: str | None = None) -> str:
    """The training run to register: ``run_id``, or the best trial of sweep ``sweep_run_id``."""
    if (run_id is None) == (sweep_run_id is None):
        raise RegistryError("give exactly one of a run id (--run) or a sweep run id (--sweep)")
    if run_id is not None:
        return run_id
    run = _client().get_run(sweep_run_id)
    best = run.data.tags.get(BEST_TRIAL_TAG)
    if not best:
        raise RegistryError(f"sweep run {sweep_run_id} has no tag {BEST_TRIAL_TAG!r} naming its best trial")
    return best


def download_run_model(run_id: str, dst: str | Path) -> Path:
    """Download the exported model folder logged under ``model/`` of a run into ``dst``."""
    import mlflow

    from tpr_core.export import INFO_FILE

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=MODEL_ARTIFACT_PATH, dst_path=str(dst)
        )
    except Exception as e:
        raise RegistryError(
            f"run {run_id} has no exported model under artifact path {MODEL_ARTIFACT_PATH!r}: {e}"
        ) from None
    path = Path(local)
    if not (path / INFO_FILE).is_file():
        raise RegistryError(f"run {run_id}: artifact {MODEL_ARTIFACT_PATH}/ is not an exported model folder")
    return path


def download_registered_model(model_uri: str, dst: str | Path) -> Path:
    """Download a registered (or logged) retrieval model; returns its local pyfunc folder."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except Exception as e:
        raise RegistryError(f"cannot download model {model_uri}: {e}") from None


def exported_dir_of(pyfunc_dir: str | Path) -> Path:
    """The exported model folder inside a downloaded retrieval model."""
    return _artifact_of(pyfunc_dir, "model")


def gallery_index_of(pyfunc_dir: str | Path) -> Path:
    """The gallery index Parquet file inside a downloaded retrieval model."""
    return _artifact_of(pyfunc_dir, "gallery")


def _artifact_of(pyfunc_dir: str | Path, key: str) -> Path:
    import yaml

    mlmodel = Path(pyfunc_dir) / "MLmodel"
    if not mlmodel.is_file():
        raise RegistryError(f"not an MLflow model folder: {mlmodel} is missing")
    spec = yaml.safe_load(mlmodel.read_text())
    try:
        rel = spec["flavors"]["python_function"]["artifacts"][key]["path"]
    except (KeyError, TypeError):
        raise RegistryError(f"{mlmodel}: field flavors.python_function.artifacts.{key} is missing") from None
    return Path(pyfunc_dir) / rel


# --------------------------------------------------------------------------- evaluation


def evaluate_exported(
    exported: Any, data_root: str | None = None, split: str = "val", topk: int = 0, split_data: Any = None
) -> EvalOutcome:
    """Evaluate a loaded exported model on one split of a prepared dataset (single process).

    Args:
        exported: a ``tpr_core.export.Exported``.
        data_root: prepared dataset; default the model's ``cfg.data.root``.
        split: ``train``, ``val`` or ``test``.
        topk: also keep the top-k gallery indices per query (for pictures).
        split_data: an already loaded split (same root and split), to avoid reading it twice.

    Returns:
        An :class:`EvalOutcome` with ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP`` (percent).
    """
    from torch.utils.data import DataLoader

    from tpr_core.data.dataset import GalleryDataset, QueryDataset, collate, load_split
    from tpr_core.eval import evaluate

    cfg = exported.cfg
    root = str(data_root or cfg.data.root)
    data = split_data if split_data is not None else load_split(root, split)
    bs = cfg.data.eval_batch_size
    images = DataLoader(GalleryDataset(data, tuple(cfg.model.image_size)), batch_size=bs, collate_fn=collate)
    texts = DataLoader(
        QueryDataset(data, exported.tokenizer, cfg.model.text_length), batch_size=bs, collate_fn=collate
    )
    result = evaluate(exported.model, images, texts, return_topk=topk)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    return EvalOutcome(metrics, result, data, root, _manifest_hash(root))


def build_gallery_index(exported: Any, data_root: str, split: str, out_path: str | Path) -> Path:
    """Encode the gallery images of a split and write the serving model's Parquet index.

    Columns: ``image_id`` int64, ``image_path`` string, ``pid`` int64 (split-local),
    ``orig_id`` int64 (dataset person id), ``embedding`` fixed_size_list<float32>[D]
    (L2-normalised). The schema metadata records split, data root and manifest hash.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from tpr_core.data.dataset import GalleryDataset, collate, load_split
    from tpr_core.data.parquet_io import load_split_table
    from tpr_core.eval import encode_images

    cfg = exported.cfg
    data = load_split(data_root, split)
    loader = DataLoader(
        GalleryDataset(data, tuple(cfg.model.image_size)),
        batch_size=cfg.data.eval_batch_size,
        collate_fn=collate,
    )
    enc = encode_images(exported.model, loader)
    feats = F.normalize(enc.feats.float(), dim=1).cpu().numpy().astype(np.float32)  # (G, D)
    image_ids = enc.ids.cpu().numpy().astype(np.int64)
    # Gallery order is the split's unique-image order; look paths and source ids up by image id.
    pos = {int(i): u for u, i in enumerate(data.unique_image_ids)}
    first_row = np.searchsorted(data.image_rows, np.arange(data.num_images))
    paths = [data.image_path(int(first_row[pos[int(i)]])) for i in image_ids]
    ids_table = load_split_table(data_root, split, columns=["image_id", "orig_id"])
    orig_of = dict(
        zip(ids_table.column("image_id").to_pylist(), ids_table.column("orig_id").to_pylist(), strict=True)
    )
    dim = feats.shape[1]
    table = pa.table(
        {
            "image_id": pa.array(image_ids, pa.int64()),
            "image_path": pa.array(paths, pa.string()),
            "pid": pa.array(enc.pids.cpu().numpy().astype(np.int64), pa.int64()),
            "orig_id": pa.array([int(orig_of[int(i)]) for i in image_ids], pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), dim),
        }
    )
    meta = {"split": split, "data_root": str(data_root), "manifest_hash": _manifest_hash(data_root) or ""}
    table = table.replace_schema_metadata({b"tpr.gallery": json.dumps(meta).encode()})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


# --------------------------------------------------------------------------- logging the pyfunc


def _pip_requirements() -> list[str]:
    # Pinned from this environment: inferring them would load the model in a subprocess.
    reqs = []
    for dist in (
        "mlflow",
        "torch",
        "safetensors",
        "tokenizers",
        "pyarrow",
        "pandas",
        "numpy",
        "pyyaml",
        "pydantic",
        "pillow",
    ):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _signature_and_example():
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"text": ["a man in a blue jacket with a black backpack"]})
    output = pd.DataFrame(
        [
            {
                "text": "a man in a blue jacket with a black backpack",
                "image_ids": [0, 1],
                "image_paths": ["imgs/a.jpg", "imgs/b.jpg"],
                "orig_ids": [1, 2],
                "scores": [0.9, 0.8],
            }
        ]
    )
    return infer_signature(example, output, params={"top_k": 10}), example


def log_registered_model(
    exported_dir: str | Path,
    data_root: str | None = None,
    split: str = "test",
    run_id: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the retrieval pyfunc (exported folder + gallery index of ``split``) into an MLflow run.

    Args:
        exported_dir: an exported model folder.
        data_root: prepared dataset for the gallery; default the model's ``cfg.data.root``.
        split: gallery split.
        run_id: log into this (existing) run; otherwise a new run is created in ``experiment``.
        experiment: experiment of the new run (default the model's ``cfg.tracking.experiment``).
        run_name: name of the new run.
        tags: tags of the new run.

    Returns:
        The logged model's URI (``models:/<model_id>``), ready for ``mlflow.register_model``.
    """
    import mlflow

    from pipelines import tracking
    from tpr_core.export import load_exported

    exported = load_exported(exported_dir, device=_device())
    root = str(data_root or exported.cfg.data.root)
    signature, example = _signature_and_example()
    with tempfile.TemporaryDirectory(prefix="tpr-gallery-") as tmp:
        gallery = build_gallery_index(exported, root, split, Path(tmp) / "gallery.parquet")
        if run_id is None:
            exp_id = tracking.get_or_create_experiment(experiment or exported.cfg.tracking.experiment)
            run_id = _client().create_run(exp_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        import tpr_core

        # The fluent run stack is per thread, so concurrent promotions do not mix their runs.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=SERVING_MODEL_NAME,
                python_model=str(SERVING_FILE),
                artifacts={"model": str(exported_dir), "gallery": str(gallery)},
                code_paths=[str(Path(tpr_core.__file__).parent)],
                signature=signature,
                input_example=example,
                pip_requirements=_pip_requirements(),
            )
    return info.model_uri


# --------------------------------------------------------------------------- the lock


class PromotionLock:
    """Mutual exclusion between promotions/rollbacks of one registered model.

    Acquire = create the registered model ``<name>.promotion-lock`` (atomic: the name is a
    unique key of the store, locally or behind a server); release = delete it. A lock whose
    creation is older than ``ttl_s`` is treated as abandoned and broken.

    Args:
        model_name: the registered model being changed.
        ttl_s: age after which a held lock is considered abandoned.
        timeout_s: how long to wait for the lock.
        poll_s: mean wait between attempts (jittered).
    """

    def __init__(
        self, model_name: str, ttl_s: float = 1800.0, timeout_s: float = 3600.0, poll_s: float = 0.5
    ):
        self.model_name = model_name
        self.lock_name = f"{model_name}{LOCK_SUFFIX}"
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.held = False

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        client = _client()
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                client.create_registered_model(
                    self.lock_name,
                    tags={"tpr.lock.owner": self.owner, "tpr.lock.ttl_s": str(self.ttl_s)},
                    description=f"Promotion lock of registered model {self.model_name!r}; held by {self.owner}.",
                )
                self.held = True
                return
            except MlflowException as e:
                if _is_code(e, "RESOURCE_DOES_NOT_EXIST"):
                    # The create lost to a holder that released before the store could describe
                    # it (the store's conflict path re-reads the existing model): retry now.
                    continue
                if not _is_code(e, "RESOURCE_ALREADY_EXISTS"):
                    raise
            holder = "unknown"
            try:
                lock = client.get_registered_model(self.lock_name)
            except MlflowException as e:
                if _is_code(e, "RESOURCE_DOES_NOT_EXIST"):
                    continue  # released between our attempt and our look: try again now
                raise
            holder = lock.tags.get("tpr.lock.owner", "unknown")
            ttl = float(lock.tags.get("tpr.lock.ttl_s", self.ttl_s))
            age = time.time() - lock.creation_timestamp / 1000.0
            if age > ttl:
                self._break(lock.creation_timestamp)
                continue
            if time.monotonic() > deadline:
                raise PromotionLockTimeout(
                    f"registered model {self.model_name!r}: promotion lock {self.lock_name!r} held by {holder} "
                    f"for {age:.0f}s; gave up after {self.timeout_s:.0f}s"
                )
            time.sleep(self.poll_s * (0.5 + random.random()))

    def _break(self, created_ms: int) -> None:
        """Delete an abandoned lock, unless it was replaced meanwhile (same creation time)."""
        from mlflow.exceptions import MlflowException

        client = _client()
        try:
            if client.get_registered_model(self.lock_name).creation_timestamp == created_ms:
                client.delete_registered_model(self.lock_name)
        except MlflowException as e:
            if not _is_code(e, "RESOURCE_DOES_NOT_EXIST"):
                raise

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        client = _client()
        try:
            lock = client.get_registered_model(self.lock_name)
            if lock.tags.get("tpr.lock.owner") == self.owner:
                client.delete_registered_model(self.lock_name)
        except MlflowException as e:
            if not _is_code(e, "RESOURCE_DOES_NOT_EXIST"):
                raise
        finally:
            self.held = False

    def __enter__(self) -> PromotionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- promote / rollback


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if _is_code(e, "RESOURCE_DOES_NOT_EXIST") or _is_code(e, "INVALID_PARAMETER_VALUE"):
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
        exported = load_exported(exported_dir_of(local), device=_device())
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
    import mlflow

    from pipelines import tracking
    from tpr_core.data.dataset import load_split
    from tpr_core.export import load_exported

    client = _client()
    source = resolve_source_run(run_id, sweep_run_id)
    src_run = client.get_run(source)
    with tempfile.TemporaryDirectory(prefix="tpr-promote-") as tmp:
        local = download_run_model(source, tmp)
        exported = load_exported(local, device=_device())
        root = str(data_root or exported.cfg.data.root)
        split_data = load_split(root, split)
        challenger = evaluate_exported(exported, root, split, split_data=split_data)

        src_tags = src_run.data.tags
        info_extra = exported.info.get("extra", {}) or {}
        manifest = (
            src_tags.get("dataset_manifest_hash")
            or exported.info.get("dataset_manifest_hash")
            or info_extra.get("manifest_hash")
            or ""
        )
        git = (
            src_tags.get("git_commit")
            or src_tags.get("mlflow.source.git.commit")
            or info_extra.get("git_commit", "")
        )
        version_tags = {
            "tpr.source_run_id": source,
            "tpr.method": exported.cfg.method,
            "tpr.dataset_manifest_hash": manifest,
            "tpr.git_commit": git,
        }
        if sweep_run_id:
            version_tags["tpr.sweep_run_id"] = sweep_run_id
        for k, v in exported.metrics.items():
            if isinstance(v, (int, float)):
                version_tags[f"tpr.metric.{k}"] = f"{float(v):.4f}"
        # The registration run: a child of the training run, holding the pyfunc and the gate's numbers.
        reg_run = client.create_run(
            src_run.info.experiment_id,
            run_name=f"register-{model_name}",
            tags={
                "tpr.source_run_id": source,
                "tpr.registered_model": model_name,
                tracking.PARENT_RUN_TAG: source,
            },
        ).info.run_id
        try:
            uri = log_registered_model(local, root, gallery_split, run_id=reg_run)
            mv = mlflow.register_model(uri, model_name, tags=version_tags)
        except BaseException:
            tracking.set_terminated(reg_run, "FAILED")
            raise
    version = str(mv.version)
    tracking.log_metrics(
        reg_run, {f"challenger/{split}/{k}": challenger.metrics[k] for k in REPORTED_METRICS}, step=0
    )

    reproduced = exported.metrics.get(f"{split}/{GATE_METRIC}")
    try:
        with PromotionLock(model_name, timeout_s=lock_timeout_s):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
            current = _alias_version(client, model_name, CHAMPION)
            champion_metrics = None
            c1 = challenger.metrics[GATE_METRIC]
            if current is not None:
                champion_metrics = _eval_version(model_name, current, root, split, split_data)
            decision, reason = gate_decision(
                c1,
                None if champion_metrics is None else champion_metrics[GATE_METRIC],
                margin,
                split,
                current,
            )
            tags = {
                "tpr.decision": decision,
                "tpr.decision_reason": reason,
                "tpr.eval.split": split,
                "tpr.eval.data_root": root,
                "tpr.eval.manifest_hash": challenger.manifest_hash or "",
                "tpr.margin": f"{margin:g}",
                "tpr.compared_with": current or "",
            }
            tags.update({f"tpr.challenger.{k}": f"{challenger.metrics[k]:.4f}" for k in REPORTED_METRICS})
            if champion_metrics is not None:
                tags.update({f"tpr.champion.{k}": f"{champion_metrics[k]:.4f}" for k in REPORTED_METRICS})
            if decision == "promoted":
                if current is not None:
                    client.set_registered_model_alias(model_name, PREVIOUS, current)
                    tags["tpr.promoted_over"] = current
                client.set_registered_model_alias(model_name, CHAMPION, version)
            for k, v in tags.items():
                client.set_model_version_tag(model_name, version, k, v)
            lines = [
                f"Decision: {decision} ({reason}).",
                f"Evaluated on split {split!r} of {root} (manifest {challenger.manifest_hash or 'unknown'}).",
                f"Challenger v{version} (run {source}): {_fmt(challenger.metrics)}.",
                f"Champion v{current}: {_fmt(champion_metrics)}."
                if current
                else "No champion before this version.",
            ]
            if manifest and challenger.manifest_hash and manifest != challenger.manifest_hash:
                lines.append(
                    f"Note: trained on dataset manifest {manifest}, evaluated on {challenger.manifest_hash}."
                )
            if reproduced is not None and abs(float(reproduced) - c1) > 0.5:
                lines.append(
                    f"Warning: the run reported {split}/R1 {float(reproduced):.2f}; re-evaluation gives {c1:.2f}."
                )
            client.update_model_version(model_name, version, description="\n".join(lines))
            champion_after = _alias_version(client, model_name, CHAMPION) or version
        if champion_metrics is not None:
            tracking.log_metrics(
                reg_run, {f"champion/{split}/{k}": champion_metrics[k] for k in REPORTED_METRICS}, step=0
            )
    except BaseException:
        tracking.set_terminated(reg_run, "FAILED")
        raise
    tracking.set_terminated(reg_run, "FINISHED")
    return PromotionResult(
        model_name=model_name,
        version=version,
        decision=decision,
        reason=reason,
        split=split,
        challenger_metrics=challenger.metrics,
        champion_metrics=champion_metrics,
        compared_with=current,
        champion=champion_after,
        source_run_id=source,
        model_uri=f"models:/{model_name}/{version}",
    )


def rollback(model_name: str, lock_timeout_s: float = 3600.0) -> RollbackResult:
    """Move ``champion`` back to ``previous-champion``.

    ``previous-champion`` then moves one step further back (to the version the restored one
    had replaced, from its ``tpr.promoted_over`` tag), or is removed when there is none. The
    rollback is recorded on the restored version (tags ``tpr.rollback.*`` and description).

    Raises:
        RegistryError: the model has no ``previous-champion``.
    """
    client = _client()
    with PromotionLock(model_name, timeout_s=lock_timeout_s):
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


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """Ranked gallery images for one text query.

    Attributes:
        rows: best first, dicts with ``image_id``, ``image_path``, ``orig_id``, ``score``.
        grid: the retrieval grid written, or None.
        note: why no grid was written (or how its frames were coloured).
    """

    rows: list[dict[str, Any]]
    grid: Path | None = None
    note: str = ""


def search(
    text: str,
    model_uri: str,
    top_k: int = 10,
    out: str | Path | None = None,
    data_root: str | None = None,
    person: int | None = None,
) -> SearchResult:
    """Query a registered retrieval model (e.g. ``models:/NAME@champion``) with one text.

    Args:
        text: the description.
        model_uri: a retrieval model URI.
        top_k: images to return.
        out: write the retrieval grid (PNG) here; needs the gallery images (``data_root``).
        data_root: prepared dataset holding the gallery; default the one the index was built from.
        person: the dataset person id (``orig_id``) the text describes, if known: the grid frames
            then show matches (green) and mismatches (red). Without it, a text equal to a
            caption of the gallery split takes that caption's person; otherwise every frame is
            drawn as a match and the note says so.

    Returns:
        A :class:`SearchResult`.
    """
    import mlflow
    import pandas as pd

    try:
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:
        raise RegistryError(f"cannot load model {model_uri}: {e}") from None
    pred = pyfunc.predict(pd.DataFrame({"text": [text]}), params={"top_k": int(top_k)})
    first = pred.iloc[0]
    rows = [
        {"image_id": int(i), "image_path": str(p), "orig_id": int(o), "score": float(s)}
        for i, p, o, s in zip(
            first["image_ids"], first["image_paths"], first["orig_ids"], first["scores"], strict=True
        )
    ]
    result = SearchResult(rows)
    if out is None:
        return result

    from tpr_core.data.dataset import load_split
    from tpr_core.data.parquet_io import load_split_table
    from tpr_core.eval import retrieval_grid

    inner = pyfunc.unwrap_python_model()
    info = getattr(inner, "gallery_info", {}) or {}
    split = info.get("split", "test")
    root = data_root or info.get("data_root") or inner.cfg.data.root
    try:
        data = load_split(root, split)
    except Exception as e:
        result.note = f"gallery images not readable from {root} split {split!r}: {e}"
        return result
    pos = {int(i): u for u, i in enumerate(data.unique_image_ids)}
    images = [data.image_bytes(pos[r["image_id"]]) for r in rows]
    if person is None:
        table = load_split_table(root, split, columns=["caption", "orig_id"])
        wanted = text.strip().lower()
        for cap, oid in zip(
            table.column("caption").to_pylist(), table.column("orig_id").to_pylist(), strict=True
        ):
            if cap.strip().lower() == wanted:
                person = int(oid)
                break
    if person is None:
        match = [True] * len(rows)
        result.note = "no known person for this text: every frame is drawn as a match"
    else:
        match = [r["orig_id"] == person for r in rows]
    result.grid = retrieval_grid([text], [images], [match], out, labels=[f"top-{len(rows)}"])
    return result
