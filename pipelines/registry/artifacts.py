"""The registered model's artifacts: where a version comes from and what it holds.

Conventions the training and sweep code follow
    - A training run logs its exported model folder (``tpr_core.export``) as its MLflow logged
      model named ``model`` (runs logged before logged models: the artifact folder ``model/``,
      ``runs:/<run_id>/model``), and tags the run ``method``, ``dataset_manifest_hash`` and
      ``git_commit``.
    - A sweep's parent run carries the tag ``tpr.best_trial_run_id`` naming the MLflow run of
      its best trial (selected on the validation split).

Registered model
    An MLflow pyfunc model defined from code (``pipelines/serving_model.py``) whose artifacts
    are the exported folder (``model``) and a gallery index (``gallery``: Parquet embeddings of
    the gallery split, see :mod:`pipelines.registry.gallery`), logged with pinned pip
    requirements, a signature and an input example. :func:`exported_dir_of` and
    :func:`gallery_index_of` find both inside a downloaded one.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.registry.common import (
    MODEL_ARTIFACT_PATH,
    SERVING_FILE,
    SERVING_MODEL_NAME,
    WEIGHTS_TAG,
    RegistryError,
    mlflow_client,
    sha256_file,
    torch_device,
)
from pipelines.registry.gallery import build_gallery_index


def resolve_source_run(run_id: str | None = None, sweep_run_id: str | None = None) -> str:
    """The training run to register: ``run_id``, or the best trial of sweep ``sweep_run_id``."""
    if (run_id is None) == (sweep_run_id is None):
        raise RegistryError("give exactly one of a run id (--run) or a sweep run id (--sweep)")
    if run_id is not None:
        return run_id
    run = mlflow_client().get_run(sweep_run_id)
    best = run.data.tags.get(tracking.BEST_TRIAL_TAG)
    if not best:
        raise RegistryError(
            f"sweep run {sweep_run_id} has no tag {tracking.BEST_TRIAL_TAG!r} naming its best trial"
        )
    return best


def best_model_id(run_id: str) -> str | None:
    """The logged model of a training run's best checkpoint (named ``model``), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.find_logged_model(run_id, MODEL_ARTIFACT_PATH)
    except MlflowException as e:
        raise RegistryError(f"cannot look up run {run_id}: {e}") from None


def run_model_uri(run_id: str) -> str:
    """The URI of a training run's exported model: its logged model ``models:/m-...``, or (runs
    logged before tpr logged models) its artifact folder ``runs:/RUN/model``."""
    model_id = best_model_id(run_id)
    return f"models:/{model_id}" if model_id else f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


def download_run_model(run_id: str, dst: str | Path) -> Path:
    """Download a training run's exported model folder into ``dst``: its logged model ``model``,
    or (runs logged before tpr logged models) its artifact folder ``model/``."""
    import mlflow

    from pipelines.tracking_server import direct_artifact_uri
    from tpr_core.export import INFO_FILE

    source = run_model_uri(run_id)
    where = f"logged model {source}" if source.startswith("models:/") else f"artifact path {MODEL_ARTIFACT_PATH!r}"
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=direct_artifact_uri(source), dst_path=str(dst))
    except Exception as e:
        raise RegistryError(f"run {run_id} has no exported model ({where}): {e}") from None
    path = Path(local)
    if not (path / INFO_FILE).is_file():
        raise RegistryError(f"run {run_id}: {where} is not an exported model folder")
    return path


def download_registered_model(model_uri: str, dst: str | Path) -> Path:
    """Download a registered (or logged) retrieval model; returns its local pyfunc folder.

    For a registry URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) the weights must
    match the SHA-256 recorded on the version at registration (``WEIGHTS_TAG``); a mismatch is
    a ``RegistryError`` naming the file.
    """
    import mlflow

    from pipelines.tracking_server import direct_artifact_uri

    try:
        uri = direct_artifact_uri(model_uri)
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:
        raise RegistryError(f"cannot download model {model_uri}: {e}") from None
    want = _recorded_weights_sha(model_uri)
    if want is not None:
        from tpr_core.export import WEIGHTS_FILE

        weights = exported_dir_of(folder) / WEIGHTS_FILE
        got = sha256_file(weights) if weights.is_file() else "missing"
        if got != want:
            raise RegistryError(
                f"{model_uri}: {WEIGHTS_FILE} ({got}) is not the file registered ({WEIGHTS_TAG} {want}); "
                "the artifact was changed after registration"
            )
    return folder


def _recorded_weights_sha(model_uri: str) -> str | None:
    """The weights hash tag of the model version a registry URI names; None for other URIs and
    for versions registered before tags were recorded."""
    import re

    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([^/]+))", model_uri)
    if m is None:
        return None
    name, version, alias = m.groups()
    client = mlflow_client()
    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except Exception as e:
        raise RegistryError(f"cannot look up {model_uri} in the registry: {e}") from None
    return (mv.tags or {}).get(WEIGHTS_TAG)


def exported_dir_of(pyfunc_dir: str | Path) -> Path:
    """The exported model folder inside a downloaded retrieval model."""
    return _artifact_of(pyfunc_dir, "model")


def gallery_index_of(pyfunc_dir: str | Path) -> Path:
    """The gallery index Parquet file inside a downloaded retrieval model."""
    return _artifact_of(pyfunc_dir, "gallery")


def load_retrieval_model(model_uri: str) -> Any:
    """A registered retrieval model, loaded by the installed ``pipelines.serving_model`` from the
    model's data alone (weights, config, tokenizer, gallery index): the code stored with the
    model version is downloaded but never imported. Returns a ready
    :class:`~pipelines.serving_model.TPRRetrievalModel`."""
    from types import SimpleNamespace

    from pipelines.serving_model import TPRRetrievalModel

    with tempfile.TemporaryDirectory(prefix="tpr-model-") as tmp:
        folder = download_registered_model(model_uri, tmp)
        model = TPRRetrievalModel()
        try:
            model.load_context(SimpleNamespace(artifacts={"model": str(exported_dir_of(folder)),
                                                          "gallery": str(gallery_index_of(folder))}))  # fmt: skip
        except RegistryError:
            raise
        except Exception as e:
            raise RegistryError(f"cannot load model {model_uri}: {e}") from None
    return model


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
    return infer_signature(example, output, params={"top_k": 10, "index_uri": ""}), example


def log_registered_model(
    exported_dir: str | Path,
    data_root: str | None = None,
    split: str = "test",
    run_id: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the retrieval pyfunc (exported folder + gallery index of ``split``) as a logged model
    of an MLflow run, without reopening the run (its status and end time stay as they are).

    Args:
        exported_dir: an exported model folder.
        data_root: prepared dataset for the gallery; default the model's ``cfg.data.root``.
        split: gallery split.
        run_id: the model's source run (the training run); otherwise a new run is created in
            ``experiment`` and ended.
        experiment: experiment of the new run (default the model's ``cfg.tracking.experiment``).
        run_name: name of the new run.
        tags: tags of the new run.

    Returns:
        The logged model's URI (``models:/<model_id>``), ready for ``mlflow.register_model``.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    import tpr_core
    from tpr_core.export import load_exported

    exported = load_exported(exported_dir, device=torch_device())
    root = str(data_root or exported.cfg.data.root)
    signature, example = _signature_and_example()
    client = mlflow_client()
    made_run = run_id is None
    if made_run:
        exp_id = tracking.get_or_create_experiment(experiment or exported.cfg.tracking.experiment)
        run_id = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {})).info.run_id
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="tpr-gallery-") as tmp:
        gallery = build_gallery_index(exported, root, split, Path(tmp) / "gallery.parquet")
        # Created first, from the run, so that logging it needs no active run (MLflow's fluent
        # run stack would reopen and then end the training run).
        model = mlflow.initialize_logged_model(
            name=SERVING_MODEL_NAME, source_run_id=run_id, experiment_id=run.info.experiment_id,
            params=dict(run.data.params), model_type="tpr-retrieval",
            tags={"tpr.gallery.split": split, "tpr.gallery.data_root": root, "tpr.method": exported.cfg.method},
        )
        info = mlflow.pyfunc.log_model(
            name=SERVING_MODEL_NAME,
            model_id=model.model_id,
            python_model=str(SERVING_FILE),
            artifacts={"model": str(exported_dir), "gallery": str(gallery)},
            code_paths=[str(Path(tpr_core.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
        )
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if made_run:
        tracking.set_terminated(run_id, "FINISHED")
    return info.model_uri
