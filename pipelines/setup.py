"""What train, sweep and evaluate share: preflight checks, the dataset and tokenizer on disk,
the local Ray instance, and Ray Train's ScalingConfig / RunConfig (built in one place).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import terminal
from pipelines.storage import is_uri
from tpr_core.config import ConfigError, ExperimentConfig

# Environment every Ray worker needs. DS_ACCELERATOR only where no GPU is used.
_WORKER_ENV_KEYS = ("MLFLOW_TRACKING_URI", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


class PreflightError(ConfigError):
    """A problem found before any Ray worker starts."""


@dataclass(frozen=True)
class RunPaths:
    """Where one training lives. ``storage`` is Ray's storage_path; the run folder is
    ``storage/name`` (checkpoints ``epoch-NNNN/``, the exported best model ``model/``)."""

    runs_dir: Path
    storage: str
    name: str

    @property
    def run_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def model_dir(self) -> str:
        return f"{self.run_dir}/model"

    @property
    def tokenizer_dir(self) -> str:
        return f"{self.run_dir}/tokenizer"


def run_paths(runs_dir: str | Path, name: str) -> RunPaths:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise PreflightError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    rd = str(runs_dir)
    if is_uri(rd):
        return RunPaths(Path("."), f"{rd.rstrip('/')}/ray", name)
    p = Path(rd).expanduser().resolve()
    return RunPaths(p, str(p / "ray"), name)


def absolutize(cfg: ExperimentConfig) -> ExperimentConfig:
    """Resolve relative local paths against the current directory: Ray workers run elsewhere."""
    data = cfg.model_dump(mode="json")
    keys = (("data", "root"), ("data", "raw_root"), ("model", "pretrained"), ("model", "pretrained_text"))
    for sec, key in keys:
        v = data[sec][key]
        if v and not is_uri(v):
            data[sec][key] = str(Path(v).expanduser().resolve())
    from tpr_core.experiment import config_from_dict

    return config_from_dict(data)


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse a run whose workers cannot all start, when the cluster is known: the local Ray tpr
    starts (no ``RAY_ADDRESS``: this machine's CPUs and GPUs) or the one this process already
    runs. A remote cluster (``RAY_ADDRESS``) may autoscale, so it is not judged here."""
    import ray
    import torch

    if os.environ.get("RAY_ADDRESS"):
        return
    if ray.is_initialized():
        res = ray.cluster_resources()
        cpus, gpus, where = res.get("CPU", 0.0), res.get("GPU", 0.0), "the local Ray instance"
    else:
        cpus, gpus, where = len(os.sched_getaffinity(0)), torch.cuda.device_count(), "this machine"
    d = cfg.distributed
    need = d.num_workers * d.cpus_per_worker
    if need > cpus:
        raise PreflightError(
            f"distributed.num_workers {d.num_workers} x distributed.cpus_per_worker {d.cpus_per_worker:g} = "
            f"{need:g} CPUs, but {where} has {cpus:g}; lower them or set RAY_ADDRESS to a cluster"
        )
    if d.use_gpu and d.num_workers > gpus:
        raise PreflightError(
            f"distributed.num_workers {d.num_workers} with distributed.use_gpu=true needs {d.num_workers} GPUs, "
            f"but {where} has {gpus:g}; lower it or set RAY_ADDRESS to a cluster"
        )


def _shared_encoder(cfg: ExperimentConfig) -> bool:
    """Whether the method's recipe uses the shared encoder (timm ViT + BERT weights, BERT's
    WordPiece vocabulary) rather than the CLIP-style dual encoder."""
    from tpr_core.models import method_spec

    return method_spec(cfg.method).encoder == "shared"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def preflight(cfg: ExperimentConfig) -> None:
    """Errors that must stop a run before Ray starts any worker."""
    import torch

    check_resources(cfg)
    d = cfg.distributed
    if d.use_gpu:
        if torch.cuda.is_available() and d.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise PreflightError(
                f"distributed.precision=bf16: this machine's GPU ({torch.cuda.get_device_name(0)}) has no bf16 support"
            )
    else:
        if d.precision == "fp16":
            raise PreflightError("distributed.precision=fp16 needs a GPU (distributed.use_gpu=true); use fp32 on CPU")
        if d.precision == "bf16" and not _cpu_has_bf16():
            raise PreflightError(
                "distributed.precision=bf16 requested on a CPU without bf16 support (no avx512_bf16/amx_bf16); use fp32"
            )
    if _shared_encoder(cfg):
        # the shared encoder (ivt): a timm ViT file (model.pretrained) and a BERT folder
        # (model.pretrained_text).
        from tpr_core.models.ivt_pretrained import check_ivt_pretrained

        try:
            check_ivt_pretrained(cfg.model)
        except (ValueError, FileNotFoundError) as e:
            raise PreflightError(str(e)) from None
    elif cfg.model.pretrained:
        from tpr_core.models.dual_encoder import check_clip_dir

        try:
            check_clip_dir(cfg.model.pretrained)
        except (ValueError, FileNotFoundError) as e:
            raise PreflightError(str(e)) from None


def ensure_dataset(cfg: ExperimentConfig) -> dict[str, Any]:
    """The prepared dataset's manifest; the synthetic set is generated and prepared on first use."""
    from tpr_core.data.prepare import prepare
    from tpr_core.data.store import read_manifest

    root = cfg.data.root
    try:
        return read_manifest(root)
    except (FileNotFoundError, ValueError) as first_error:
        if cfg.data.format != "synthetic":
            raise PreflightError(
                f"data.root {root}: not a prepared dataset ({first_error}). "
                f"Run: tpr data prepare --format {cfg.data.format} --root RAW_DIR --out {root}"
            ) from None
    from tpr_core.data.synth import ensure_synthetic

    s = cfg.data.synthetic
    raw = cfg.data.raw_root or str(Path(root).parent / "raw")
    ensure_synthetic(
        raw,
        identities=s.identities,
        images_per_identity=s.images_per_identity,
        captions_per_image=s.captions_per_image,
        seed=s.seed,
        size=tuple(s.size),
    )
    if not Path(root).exists():
        prepare("cuhk-pedes", raw, root)
    return read_manifest(root)


def ensure_tokenizer(cfg: ExperimentConfig, out_dir: str) -> str:
    """Save the run's tokenizer to ``out_dir`` (kept if already there, so a resume reuses it).

    From-scratch runs train one on the training captions; runs from a CLIP directory take its
    tokenizer (plus a mask token); ivt runs from a BERT folder (``model.pretrained_text``)
    take that folder's WordPiece tokenizer. An ivt run with ``model.pretrained`` only (a ViT
    and no BERT) trains one on the captions.
    """
    from tpr_core.data.dataset import load_split
    from tpr_core.data.tokenizer import Tokenizer

    out = Path(out_dir)
    if (out / "tpr_tokenizer.json").exists():
        return str(out)
    shared = _shared_encoder(cfg)
    if shared and cfg.model.pretrained_text:
        try:
            tok = Tokenizer.from_bert(cfg.model.pretrained_text, max_length=cfg.model.text_length)
        except (ValueError, FileNotFoundError) as e:
            raise PreflightError(f"model.pretrained_text {cfg.model.pretrained_text}: {e}") from None
    elif not shared and cfg.model.pretrained:
        tok = Tokenizer.from_clip(cfg.model.pretrained, max_length=cfg.model.text_length)
    else:
        train = load_split(cfg.data.root, "train")
        captions = [train.caption(i) for i in range(len(train))]
        vocab = 49408 if cfg.model.preset == "base" else 4096
        tok = Tokenizer.train(captions, vocab_size=vocab, max_length=cfg.model.text_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, out)
    return str(out)


def git_commit() -> str:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parents[1],
        )
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def use_private_ray_token() -> bool:
    """Token authentication for a local Ray instance, without writing ``~/.ray/auth_token``.

    Left alone, a first local ``ray.init()`` turns token authentication on and saves a new token
    to ``~/.ray/auth_token``; from then on every ``ray start`` and ``ray job submit`` on the
    machine needs it. Here, unless the user chose (``RAY_AUTH_MODE``) or holds a token
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), a fresh token lives in
    this process's environment only: Ray's own processes and workers inherit it and it is gone
    with them. Returns True when a private token was set.
    """
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return False
    if (Path.home() / ".ray" / "auth_token").is_file():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    try:  # Ray caches its mode and token once loaded; make it read them again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # another Ray version: it reads them at init
        pass
    return True


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS, or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _WORKER_ENV_KEYS if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(terminal.quiet_env())
    if not os.environ.get("RAY_ADDRESS"):
        use_private_ray_token()
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime env applies (a second one would conflict);
        # Train workers get their variables from RunConfig.worker_runtime_env either way.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=terminal.ray_logging_level())
    else:
        # Ray Train's placement-group cleaner (it frees the workers of a trial ASHA stopped) asks
        # the state API whether the trial's controller lives; without an address that API finds
        # the Ray instance started *last* on this machine, which is not ours when another one
        # runs. Our dashboard's address, given to every process of the job, keeps it on ours.
        from pipelines.tracking_server import _free_port

        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, log_to_driver=True,
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 logging_level=terminal.ray_logging_level())
    terminal.filter_ray_output()


def worker_env(cfg: ExperimentConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in _WORKER_ENV_KEYS if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(terminal.quiet_env())  # verbosity, MLflow's URL prints and log level
    # Ray Train reroutes a worker's print() through logging and, once anything wraps stdout,
    # prints it a second time as well: the progress lines would show twice on the driver.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.distributed.cpus_per_worker))))
    if not cfg.distributed.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def ray_configs(cfg: ExperimentConfig, paths: RunPaths, callbacks: list | None = None) -> tuple[Any, Any]:
    """ScalingConfig and RunConfig for one training; used by train, sweep and evaluate alike."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    d = cfg.distributed
    scaling = ScalingConfig(
        num_workers=d.num_workers,
        use_gpu=d.use_gpu,
        resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})},
    )
    run = RunConfig(
        name=paths.name,
        storage_path=paths.storage,
        failure_config=FailureConfig(max_failures=d.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.keep_best,
            checkpoint_score_attribute="val/R1",
            checkpoint_score_order="max",
        ),
        worker_runtime_env={"env_vars": worker_env(cfg)},
        callbacks=callbacks or None,
        logging_config=terminal.train_logging_config(),
    )
    return scaling, run
