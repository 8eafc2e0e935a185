"""Search spaces as data: ``tune_spaces/*.yaml``.

A space file::

    # tpr sweep pipelines/configs/fmfa_synthetic_tiny.yaml --space tune_spaces/fmfa.yaml
    metric: best_val/R1     # what the search and ASHA optimise (the one choice, see below)
    mode: max
    search: optuna          # optuna (TPE) | random
    samples: 8              # default trial count (--samples overrides)
    scheduler:              # ASHA over training iterations (one per reported epoch)
      type: asha            # asha | none
      grace_period: 2
      reduction_factor: 2
    params:                 # dotted config key -> one distribution
      loss.weights.efa: {uniform: [0.5, 2.0]}
      loss.a_sdm_alpha: {loguniform: [1.0, 30.0]}
      loss.mlm_mask_ratio: {quniform: [0.1, 0.3, 0.05]}
      model.cross_depth: {randint: [1, 5]}        # upper bound exclusive, as in Ray Tune
      data.sampler: {choice: [random, identity]}

Every key is checked against the experiment schema and every range end (or choice)
against the field's own validation before anything starts; errors name the key.

The metric is the running best ``best_val/R1`` that every training report carries (the val R@1
of the epoch the run will export so far), with mode ``max``: Tune's best trial is then the trial
whose exported model is best, and its "current best" never jumps back with a worse last epoch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tpr_core.config import ConfigError, ExperimentConfig, apply_overrides, check_dotted_key, read_yaml
from tpr_core.experiment import check_experiment, config_from_dict

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")
METRIC = "best_val/R1"  # pipelines.worker.loop.BEST_METRIC, reported by every training


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["asha", "none"] = Field("asha", description="Early stopping scheduler.")
    grace_period: int = Field(2, ge=1, description="Iterations (reported epochs) before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA halving rate.")


class SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(METRIC, description=f"Metric optimised: {METRIC}, the run's best val R@1 so far.")
    mode: Literal["max", "min"] = Field("max", description="max (R@1 is better higher).")
    search: Literal["optuna", "random"] = "optuna"
    samples: int = Field(8, ge=1)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    params: dict[str, dict[str, list[Any]]]

    @field_validator("metric")
    @classmethod
    def _running_best(cls, v: str) -> str:
        if v != METRIC:
            raise ValueError(
                f"{v!r}: use {METRIC!r}, the best val R@1 of the run so far, which picks the model "
                "tpr exports (the last epoch's val/R1 would rank trials by another epoch)"
            )
        return v

    @field_validator("mode")
    @classmethod
    def _max(cls, v: str) -> str:
        if v != "max":
            raise ValueError(f"{v!r}: {METRIC} is better higher, use 'max'")
        return v

    @field_validator("params")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("params: at least one searched key is needed")
        return v


def _check_param(key: str, dist: dict[str, list[Any]], base: dict[str, Any], source: str) -> None:
    where = f"{source}: params.{key}"
    try:
        check_dotted_key(key)
    except ConfigError:
        raise ConfigError(f"{where}: unknown config key {key!r}") from None
    if len(dist) != 1:
        raise ConfigError(f"{where}: give exactly one distribution of {list(DISTRIBUTIONS)}")
    (kind, args), = dist.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; known: {list(DISTRIBUTIONS)}")
    if not isinstance(args, list):
        raise ConfigError(f"{where}: {kind} takes a list of arguments")
    if kind == "choice":
        if not args:
            raise ConfigError(f"{where}: choice needs at least one value")
        probes = args
    else:
        want = 3 if kind == "quniform" else 2
        if len(args) != want or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {kind} takes {want} numbers, got {args!r}")
        lo, hi = args[0], args[1]
        if not lo < hi:
            raise ConfigError(f"{where}: {kind} needs low < high, got {lo} >= {hi}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: loguniform needs a positive low bound, got {lo}")
        if kind == "quniform" and args[2] <= 0:
            raise ConfigError(f"{where}: quniform needs a positive step, got {args[2]}")
        if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"{where}: randint takes integers, got {args!r}")
        # randint's high is exclusive
        probes = [lo, hi - 1] if kind == "randint" else [lo, hi]
    for value in probes:
        tree = copy.deepcopy(base)
        apply_overrides(tree, {key: value})
        try:
            check_experiment(ExperimentConfig.model_validate(tree))
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"{where}: value {value!r} is outside what the config accepts ({msgs})") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} is outside what the config accepts ({e})") from None


def load_space(path: str | Path, base: ExperimentConfig) -> SpaceFile:
    """Read and check a space file against ``base`` (the trial config before sampling)."""
    path = Path(path)
    raw = read_yaml(path, "space")
    try:
        space = SpaceFile.model_validate(raw)
    except ValidationError as e:
        lines = [f"invalid space {path}:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    tree = base.model_dump(mode="json")
    for key, dist in space.params.items():
        _check_param(key, dist, tree, str(path))
    return space


def tune_distributions(space: SpaceFile) -> dict[str, Any]:
    """The params as Ray Tune sample objects, keyed by dotted name."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dist in space.params.items():
        (kind, args), = dist.items()
        if kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "quniform":
            out[key] = tune.quniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(*args)
        else:
            out[key] = tune.choice(args)
    return out


def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with one trial's sampled values applied."""
    tree = base.model_dump(mode="json")
    apply_overrides(tree, {k: v for k, v in params.items()})
    return config_from_dict(tree, "<trial>")
