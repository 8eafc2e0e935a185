"""Names every registry module shares: artifact paths, aliases, exit codes, the error type, and
the small MLflow, dataset and device look-ups they all make."""

from __future__ import annotations

from pathlib import Path

# A training run's exported model folder: the name of its logged model (older runs: the
# artifact folder runs:/<run_id>/model).
MODEL_ARTIFACT_PATH = "model"
SERVING_MODEL_NAME = "retrieval_model"  # the retrieval pyfunc a promotion logs from the training run
SERVING_FILE = Path(__file__).parent.parent / "serving_model.py"  # the pyfunc, from code

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"

EXIT_PROMOTED = 0
EXIT_KEPT = 3

LOCK_SUFFIX = ".promotion-lock"
# On a model version: the SHA-256 of its weights file, recorded at registration and checked
# by every load through the registry (a changed artifact is refused, whatever export.json says).
WEIGHTS_TAG = "tpr.weights_sha256"
GATE_METRIC = "R1"
GATE_SPLIT_TAG = "tpr.gate.split"  # the split a version was judged on
GATE_R1_TAG = "tpr.gate.R1"  # its R@1 there


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says what is missing."""


def mlflow_client():
    """An ``MlflowClient`` on the current tracking URI."""
    from mlflow import MlflowClient

    return MlflowClient()


def has_error_code(err: Exception, code: str) -> bool:
    """Whether an MLflow exception carries ``error_code == code`` (e.g. ``RESOURCE_ALREADY_EXISTS``)."""
    return getattr(err, "error_code", None) == code


def manifest_hash(data_root: str) -> str | None:
    """The content hash of a prepared dataset's manifest, or None when it has none."""
    from tpr_core.data.store import read_manifest

    try:
        return str(read_manifest(data_root).get("content_hash"))
    except Exception:  # a root without a manifest is reported by load_split with a clearer message
        return None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
