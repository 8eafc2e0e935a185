"""Shared fixtures of the integration tests: one small synthetic dataset per session, one
local Ray instance per test module (started by the module's fixture), CPU DeepSpeed."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict[str, str]:
    """300 identities x 4 images at 96x32, generated and prepared once per session."""
    from tpr_core.data.prepare import prepare
    from tpr_core.data.synth import ensure_synthetic

    root = tmp_path_factory.mktemp("synth")
    raw = ensure_synthetic(root / "raw", identities=300, images_per_identity=4, seed=0, size=(96, 32))
    prepare("cuhk-pedes", raw, root / "parquet")
    return {"raw": str(raw), "root": str(root / "parquet")}


def tiny_overrides(synth_data: dict[str, str], **extra) -> list[str]:
    """Overrides that point a shipped tiny config at the session dataset."""
    out = [
        f"data.root={synth_data['root']}",
        f"data.raw_root={synth_data['raw']}",
        "data.synthetic.size=[96, 32]",
    ]
    out += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return out


def every_epoch(epochs: int, steps: int, **extra) -> dict:
    """Overrides of a short run that validates and checkpoints after every epoch of ``steps``
    steps (pass ``train__log_every=1`` etc. in ``extra``)."""
    return dict(
        train__epochs=epochs,
        train__eval_every=1,
        train__checkpoint_every=1,
        train__max_steps_per_epoch=steps,
        **extra,
    )


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance shared by a test module."""
    import os

    import ray

    from pipelines.setup import init_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_ray(num_cpus=2)  # the same local start as the CLI's
    yield
    ray.shutdown()
