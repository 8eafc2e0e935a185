"""Typed experiment configuration.

One YAML file describes one experiment; it is validated into :class:`ExperimentConfig`
before anything else happens. This module is the schema alone: the checks that need a
method's recipe (its loss terms, its encoder) and the loading entry points that run them
are in ``tpr_core.experiment``. Configs hold primitives and nested models only, so
``model_dump()`` goes straight into MLflow params and Ray's ``train_loop_config``.

Every leaf is addressable by a dotted path (``loss.weights.efa``, ``optim.lr``); the
same paths are used by command-line overrides and by Ray Tune search spaces.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tpr_core.data.formats import FORMATS

# Largest image side a config accepts: the papers train on 384 x 128 crops.
MAX_IMAGE_SIDE = 2048


class ConfigError(ValueError):
    """A configuration problem, with the offending key named in the message."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping gives one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (plain YAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float) or key == "<<":
            continue  # unhashable keys are construct_mapping's to refuse; merge keys may repeat
        if key in seen:
            raise DuplicateKeyError(None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_bool(v) for v in value)
    if isinstance(value, dict):
        return any(_has_bool(v) for v in value.values())
    return False


class _Strict(BaseModel):
    """A config section: unknown keys, NaN and infinities are errors, and so is a boolean where
    the field holds no boolean (pydantic would read ``true`` as 1 or 1.0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return value  # a section checks its own fields
        if "bool" not in str(field.annotation) and _has_bool(value):
            ann = field.annotation
            raise ValueError(f"{value!r}: a boolean where {ann.__name__ if isinstance(ann, type) else ann} is expected")
        return value


class ModelConfig(_Strict):
    """Encoder sizes and heads."""

    preset: Literal["tiny", "base"] = Field("tiny", description="Encoder size preset.")
    pretrained: str | None = Field(
        None,
        description=(
            "Local weights to start from, nothing downloaded. irra/fmfa/uit: a Hugging Face CLIP directory "
            "(the dual encoder). ivt: a timm ViT checkpoint, a .safetensors file or a folder holding "
            "model.safetensors (timm's Hugging Face layout, e.g. vit_base_patch16_224); it gives the patch "
            "embedding, class token, positions (resized bilinearly to the patch grid), attention, norms and "
            "the image FFNs of the shared encoder."
        ),
    )
    pretrained_text: str | None = Field(
        None,
        description=(
            "ivt only: a local Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin, "
            "vocab.txt; e.g. bert-base-uncased) giving the text embedding (word, position, token type, "
            "layernorm) and the text FFNs; the run's tokenizer must be that folder's WordPiece vocabulary."
        ),
    )
    image_size: tuple[int, int] = Field((384, 128), description="Input image (height, width).")
    patch_size: int = Field(16, ge=2, le=64, description="ViT patch size (the patch embedding's kernel) in pixels.")
    patch_stride: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "ivt only: stride of the patch embedding, at most patch_size; null: patch_size (no overlap). "
            "IVT: 12 on CUHK-PEDES and ICFG-PEDES (a 31 x 10 grid at 384 x 128), 16 on RSTPReid."
        ),
    )
    text_length: int = Field(77, ge=8, le=512, description="Max caption length in tokens.")
    drop_path: float = Field(
        0.0, ge=0.0, lt=1.0, description="ivt only: stochastic depth of the last block, linear from 0 (IVT: 0.1)."
    )
    text_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="ivt only: dropout after the text embedding (IVT: BERT's 0.1)."
    )
    embed_dim: int | None = Field(
        None, ge=8, description="Joint embedding size; None takes the preset's (512 for base)."
    )
    cross_depth: int = Field(
        4, ge=1, le=12, description="Depth of the IRR cross-modal transformer (IRRA/FMFA)."
    )
    restore_depth: int = Field(4, ge=1, le=12, description="Depth of UIT's restoration decoder.")

    @field_validator("image_size")
    @classmethod
    def _divisible(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError("image_size must be positive")
        if max(v) > MAX_IMAGE_SIDE:
            raise ValueError(f"image_size {tuple(v)}: a side over {MAX_IMAGE_SIDE} pixels is not a pedestrian crop")
        return v

    @model_validator(mode="after")
    def _grid(self) -> ModelConfig:
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"model.image_size {self.image_size} must be divisible by model.patch_size {self.patch_size}"
            )
        if self.patch_stride is not None and self.patch_stride > self.patch_size:
            raise ValueError(
                f"model.patch_stride {self.patch_stride} must be at most model.patch_size {self.patch_size}"
            )
        return self


class LossConfig(_Strict):
    """Loss weights and every loss hyperparameter a sweep may search."""

    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per loss term; terms the method defines but not listed take its defaults.",
    )
    temperature: float = Field(0.02, gt=0.0, le=1.0, description="Softmax temperature of SDM / A-SDM.")
    mlm_mask_ratio: float = Field(0.15, gt=0.0, lt=1.0, description="Share of caption tokens masked for MLM.")
    gather: Literal["global", "local"] = Field(
        "global",
        description=(
            "global: the batch-level terms (SDM, A-SDM, EFA, triplet, CMPM) compare every sample of the "
            "global batch, gathered from all workers (as one process on data.batch_size); local: each "
            "worker's share only (results then depend on the number of workers)."
        ),
    )
    a_sdm_form: Literal["paper", "code"] = Field(
        "code",
        description=(
            "A-SDM row weight. code (FMFA's released code): 1 + 0.1 (cos to the row's most similar item - "
            "cos to its first positive) when the two differ, not detached; paper: "
            "a_sdm_alpha (max_k p_ik - p_ii) + 1 on detached probabilities."
        ),
    )
    a_sdm_alpha: float = Field(
        10.0, ge=0.0, le=100.0, description="A-SDM strength alpha of the paper form (paper: 10; 1 on RSTPReid)."
    )
    efa_form: Literal["paper", "code"] = Field(
        "code",
        description=(
            "EFA. code (FMFA's released code): every text position, log-sum-exp pooling at tau 1, rows of "
            "the pair-score matrix L2-normalised, margins 0.1 / 0.9, no identity handling; paper: word "
            "tokens, tau 0.1, no row normalisation, same-identity pairs not negatives."
        ),
    )
    efa_margin_text: float | None = Field(
        None, ge=0.0, le=5.0, description="EFA hinge margin, text to joint; null: the form's (0.1 both forms)."
    )
    efa_margin_image: float | None = Field(
        None,
        ge=0.0,
        le=5.0,
        description="EFA hinge margin, image to joint; null: the form's (code 0.9, paper 0.1 on CUHK-PEDES).",
    )
    mla_form: Literal["joint", "separate"] = Field(
        "joint",
        description=(
            "IVT multi-level alignment. joint (IVT's code): one CMPM over the sentence, phrase and word "
            "rows together (3B), each level with its own augmented view of the image; separate: one CMPM "
            "per level against one image view, summed."
        ),
    )
    cmpm_label_norm: Literal["sum", "l2"] = Field(
        "sum",
        description="CMPM true-match labels divided by their sum (the CMPM paper) or their L2 norm (IVT's code).",
    )
    triplet_margin: float = Field(0.05, ge=0.0, le=2.0, description="Cross-modal triplet margin (UIT).")
    restore_mask_ratio: float = Field(0.7, gt=0.0, lt=1.0, description="Share of patches dropped (UIT).")
    bmm_mask_ratio: float = Field(0.2, ge=0.0, lt=1.0, description="Max share of tokens dropped (IVT BMM).")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if not (math.isfinite(w) and w >= 0):  # NaN fails every comparison: ask for finite
                raise ValueError(f"loss.weights.{k} must be finite and >= 0, got {w}")
        return v


class SynthConfig(_Strict):
    """Synthetic dataset generated on first use when ``data.format`` is ``synthetic``."""

    identities: int = Field(300, ge=6, description="Number of identities.")
    images_per_identity: int = Field(4, ge=1, description="Images per identity.")
    captions_per_image: int = Field(2, ge=1, le=5, description="Captions per image.")
    seed: int = Field(0, description="Generator seed; same seed, same bytes.")
    size: tuple[int, int] = Field((384, 128), description="Rendered image (height, width).")


class DataConfig(_Strict):
    """Where the data is and how batches are drawn."""

    format: Literal[("synthetic", *FORMATS)] = Field(  # the source formats of tpr_core.data.formats
        "synthetic", description="Source format of the raw dataset."
    )
    root: str = Field(
        "data/synthetic",
        description="Prepared dataset (Parquet shards + _manifest.json); a local path or an fs URI (s3://...).",
    )
    raw_root: str | None = Field(
        None, description="Raw dataset to prepare on first use; for synthetic, where it is generated."
    )
    synthetic: SynthConfig = Field(default_factory=SynthConfig)
    batch_size: int = Field(
        64,
        ge=1,
        description=(
            "Global batch size: the samples of one optimizer step over all workers, and (with "
            "loss.gather: global and grad_accum 1) the batch every batch-level loss term compares. Each "
            "worker's micro-batch is data.batch_size / (distributed.num_workers x distributed.grad_accum)."
        ),
    )
    eval_batch_size: int = Field(256, ge=1, description="Batch size for encoding during evaluation.")
    sampler: Literal["random", "identity", "identity_random_k"] = Field(
        "random",
        description=(
            "random; identity: P identities x K instances per global batch (IRRA's identity sampler); "
            "identity_random_k: each identity 1..K instances, K drawn per identity and epoch (UIT/SEN's "
            "idrannum). Left unset, the method's recipe decides (uit: identity_random_k; irra, fmfa, "
            "ivt: random)."
        ),
    )
    instances_per_identity: int = Field(
        4, ge=1, description="K of the identity samplers (UIT: 2, the largest group of identity_random_k)."
    )
    loader_workers: int = Field(1, ge=0, le=64, description="DataLoader worker processes per rank.")
    augment: bool = Field(True, description="Flip, pad-and-crop and random erasing on training images.")
    text_aug_prob: float = Field(0.0, ge=0.0, le=1.0, description="UIT caption pruning probability.")


class OptimConfig(_Strict):
    """Optimizer, parameter groups and LR schedule (``tpr_core.optim``).

    Defaults are IRRA's released code (``solver/build.py``, ``utils/options.py``): Adam
    (eps 1e-3), lr 1e-5, 5x for the randomly initialised cross-modal modules, MLM head and
    classifier, 2x and no weight decay for biases, weight decay on every other parameter,
    a per-epoch linear warm-up from 0.1x over 5 epochs then cosine to 0.
    """

    name: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="torch.optim.Adam (L2 weight decay, as the authors' Adam), AdamW or SGD."
    )
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="Base learning rate (every parameter not named below).")
    head_modules: list[str] = Field(
        default_factory=lambda: [
            "irr.cross_attn", "irr.transformer", "irr.mlm_head", "classifier",
            "restorer.cross_attn", "restorer.transformer",
        ],
        description=(
            "Parameter-name prefixes (module paths in the method module) trained at lr x head_lr_factor; "
            "default: what IRRA's code puts at 5x ('cross' modules, mlm_head, classifier) and UIT's "
            "(its restoration cross-attentions and transformer); prefixes a method lacks match nothing."
        ),
    )
    head_lr_factor: float = Field(5.0, gt=0.0, le=1000.0, description="LR multiplier for head_modules.")
    bias_lr_factor: float = Field(
        2.0, gt=0.0, le=100.0,
        description="LR multiplier for biases (last name part contains 'bias'); replaces head_lr_factor.",
    )
    head_bias_modules: list[str] = Field(
        default_factory=lambda: ["irr.mlm_head", "classifier"],
        description=(
            "Prefixes whose biases get lr x head_lr_factor instead of lr x bias_lr_factor (IRRA's code "
            "applies its classifier/mlm_head rule after its bias rule, its 'cross' rule before)."
        ),
    )
    bias_rule: Literal["authors", "stacked"] = Field(
        "authors",
        description=(
            "authors: a bias is a parameter whose last name part contains 'bias' (in_proj_bias too), at "
            "lr x bias_lr_factor or, in head_bias_modules, lr x head_lr_factor; stacked (tpr's earlier rule, "
            "tiny configs): only names ending in '.bias', at their module's lr x bias_lr_factor."
        ),
    )
    weight_decay: float = Field(4e-5, ge=0.0, le=1.0, description="Weight decay of non-bias parameters.")
    bias_weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Weight decay of biases.")
    decay_1d_params: bool = Field(
        True,
        description="Decay 1-D non-bias parameters (norm scales, class token) too, as the authors' code; "
        "false exempts them (tpr's earlier rule; tiny configs).",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas, each in [0, 1).")
    eps: float = Field(1e-3, gt=0.0, le=1.0, description="Adam/AdamW epsilon (IRRA's Adam: 1e-3).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only; no dampening, no Nesterov).")
    schedule_unit: Literal["epoch", "step"] = Field(
        "epoch",
        description="epoch: the LR changes once per epoch (the authors' schedulers); step: every optimizer step.",
    )
    warmup_epochs: float = Field(5.0, ge=0.0, description="Linear warm-up length in epochs.")
    warmup_factor: float = Field(0.1, gt=0.0, le=1.0, description="LR factor at the start of warm-up.")
    min_lr_factor: float = Field(0.0, ge=0.0, le=1.0, description="Cosine floor as a factor of the LR.")
    warmup_prefix: bool = Field(
        True,
        description="true: the cosine runs from the end of warm-up, (t - warmup) / (T - warmup) (IRRA); "
        "false: t / T, warm-up overwrites its start (timm's CosineLRScheduler, IVT).",
    )
    schedule_anchor: Literal["group", "base"] = Field(
        "group",
        description="What warmup_factor and min_lr_factor scale: each group's own LR (IRRA) or optim.lr "
        "for every group (IVT: warm-up from 0.01 x BASE_LR, floor 0.002 x BASE_LR).",
    )
    epoch_offset: int = Field(
        0, ge=0, le=1000,
        description="Schedule epoch t of tpr's first epoch (IRRA: 0; IVT on CUHK-PEDES steps its scheduler from 1).",
    )
    cosine_epochs: int | None = Field(
        None, ge=1, description="Cosine length T in epochs; null: train.epochs."
    )
    grad_clip: float = Field(0.0, ge=0.0, description="Gradient norm clipping; 0 disables it.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"optim.betas {tuple(v)}: each must be in [0, 1)")
        return v

    @field_validator("head_modules", "head_bias_modules")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        out = [p.strip().rstrip(".") for p in v]
        if any(not p for p in out):
            raise ValueError("module prefixes must be non-empty")
        return out


class TrainConfig(_Strict):
    """Epochs and cadences."""

    epochs: int = Field(60, ge=1, description="Training epochs.")
    eval_every: int = Field(1, ge=1, description="Validate every N epochs.")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every N epochs.")
    keep_best: int = Field(2, ge=1, description="Checkpoints kept, best by val/R1.")
    seed: int = Field(1, description="Global seed.")
    log_every: int = Field(10, ge=1, description="Log train metrics every N optimizer steps.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch (tests).")


class DistributedConfig(_Strict):
    """Ray Train worker group and DeepSpeed engine."""

    num_workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (one rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker; NCCL when true, gloo otherwise.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts Ray Train may do (-1: unlimited).")


class TrackingConfig(_Strict):
    """MLflow names."""

    experiment: str = Field("tpr", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name; also the Ray run name (resume key).")
    system_metrics_interval_s: float = Field(
        10.0, ge=0.0,
        description="Seconds between MLflow system metrics samples (CPU, memory, disk, network, GPU) "
        "of rank 0's node; 0 turns them off.",
    )


class ExperimentConfig(_Strict):
    """One training of one method."""

    method: str = Field("irra", description="Registered method name (irra, fmfa, uit, ivt).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        """Checks across sections that need no method recipe (``tpr_core.experiment`` does those)."""
        d = self.distributed
        per_step = d.num_workers * d.grad_accum
        if self.data.batch_size % per_step:
            raise ValueError(
                f"data.batch_size {self.data.batch_size} must be divisible by "
                f"distributed.num_workers x distributed.grad_accum = {per_step}"
            )
        global_micro = self.data.batch_size // d.grad_accum
        if self.data.sampler == "identity" and global_micro % self.data.instances_per_identity:
            raise ValueError(
                f"global micro-batch {global_micro} (data.batch_size / distributed.grad_accum) must be "
                f"divisible by data.instances_per_identity {self.data.instances_per_identity}"
            )
        if self.train.checkpoint_every % self.train.eval_every and self.train.eval_every % self.train.checkpoint_every:
            raise ValueError(
                f"train.checkpoint_every {self.train.checkpoint_every} and train.eval_every "
                f"{self.train.eval_every} must divide one another"
            )
        return self


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (``1e-5`` -> float, ``[1, 2]`` -> list, ``null``)."""
    try:
        v = safe_load_yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(f"override value {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-5" as a string; accept the usual float spellings.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _known_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        path = f"{prefix}{name}"
        out.add(path)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _known_paths(ann, path + ".")
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted == "a.b.c"``, creating dicts on the way."""
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def check_dotted_key(dotted: str) -> None:
    """Raise :class:`ConfigError` unless ``dotted`` names a config field (or a loss weight)."""
    if dotted.startswith("loss.weights.") and dotted.count(".") == 2:
        return
    if dotted not in _known_paths(ExperimentConfig):
        raise ConfigError(f"unknown config key {dotted!r}")


def apply_overrides(tree: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``key=value`` strings (or a dotted-key dict) to a raw config tree, in place."""
    items: list[tuple[str, Any]]
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form key=value")
            k, v = o.split("=", 1)
            items.append((k.strip(), _parse_value(v.strip())))
    for k, v in items:
        check_dotted_key(k)
        set_dotted(tree, k, v)
    return tree


def parse_config(tree: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a raw config tree against the schema only; errors name ``source`` and each key.

    The checks against the method's recipe are ``tpr_core.experiment``'s: load configs with
    ``tpr_core.experiment.load_config`` / ``config_from_dict``, which call this and then those.
    """
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The content of a YAML file (``{}`` when empty), read safely (no object tags); a missing
    file or invalid YAML raises ``error`` naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        return safe_load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None


def read_config_tree(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    """The raw tree of a YAML config with dotted overrides applied (not validated)."""
    tree = read_yaml(path, "config")
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    if overrides:
        apply_overrides(tree, overrides)
    return tree


def per_worker_batch(cfg: ExperimentConfig) -> int:
    """Rows in one micro-batch of one worker: data.batch_size / (num_workers x grad_accum)."""
    d = cfg.distributed
    return cfg.data.batch_size // (d.num_workers * d.grad_accum)


def derived_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """Values that follow from the config, logged beside it (MLflow params, resolved YAML)."""
    global_micro = cfg.data.batch_size // cfg.distributed.grad_accum
    return {
        "derived.batch_size_per_worker": per_worker_batch(cfg),
        "derived.loss_batch": global_micro if cfg.loss.gather == "global" else per_worker_batch(cfg),
    }


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, headed by a comment with the derived batch sizes; ``load_config`` of
    it gives back an equal config."""
    derived = derived_params(cfg)
    head = (
        f"# derived: {derived['derived.batch_size_per_worker']} samples per worker and micro-batch "
        f"(data.batch_size {cfg.data.batch_size} / {cfg.distributed.num_workers} workers / grad_accum "
        f"{cfg.distributed.grad_accum}); the batch-level loss terms compare {derived['derived.loss_batch']} "
        f"samples (loss.gather: {cfg.loss.gather})\n"
    )
    return head + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def field_bounds(dotted: str) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low_inclusive, high_inclusive) of a numeric field, for sweep-space checks."""
    check_dotted_key(dotted)
    if dotted.startswith("loss.weights."):
        return 0.0, None, True, True
    parts = dotted.split(".")
    model: type[BaseModel] = ExperimentConfig
    for p in parts[:-1]:
        model = model.model_fields[p].annotation  # type: ignore[assignment]
    field = model.model_fields[parts[-1]]
    lo = hi = None
    lo_inc = hi_inc = True
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            lo, lo_inc = m.ge, True
        if getattr(m, "gt", None) is not None:
            lo, lo_inc = m.gt, False
        if getattr(m, "le", None) is not None:
            hi, hi_inc = m.le, True
        if getattr(m, "lt", None) is not None:
            hi, hi_inc = m.lt, False
    return lo, hi, lo_inc, hi_inc
