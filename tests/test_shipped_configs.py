"""Every shipped experiment YAML and tune space loads through the checking entry points.

Collected from the folders, so a new file is tested without a line here: an experiment config
``<method>_<dataset>_<preset>.yaml`` must load (``tpr_core.experiment.load_config``) as that
method, that dataset format and that preset; a space must load (``pipelines.space.load_space``)
against the base config its header command names, search only known keys, and a weight only
of a term of that config's method.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.space import load_space, trial_config
from tpr_core.config import check_dotted_key
from tpr_core.experiment import load_config
from tpr_core.models import method_spec

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))
FORMATS = {"cuhk": "cuhk-pedes", "icfg": "icfg-pedes", "rstp": "rstpreid", "synthetic": "synthetic"}
NAME = re.compile(r"(?P<method>[a-z]+)_(?P<dataset>[a-z]+)_(?P<preset>tiny|base)\.yaml")


def test_the_folders_hold_what_the_methods_and_datasets_need() -> None:
    names = {p.name for p in CONFIGS}
    for method in ("irra", "fmfa", "uit", "ivt"):
        assert {f"{method}_{ds}_base.yaml" for ds in ("cuhk", "icfg", "rstp")} <= names
        assert f"{method}_synthetic_tiny.yaml" in names
        assert any(p.name.startswith(f"{method}") for p in SPACES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_experiment_config_loads_as_its_name_says(path: Path) -> None:
    m = NAME.fullmatch(path.name)
    assert m, f"{path.name} is not named <method>_<dataset>_<preset>.yaml"
    header = path.read_text().splitlines()[0]
    assert header.startswith("# tpr ") and f"pipelines/configs/{path.name}" in header, header
    cfg = load_config(path)
    assert cfg.method == m["method"]
    assert cfg.data.format == FORMATS[m["dataset"]]
    assert cfg.model.preset == m["preset"]
    assert set(cfg.loss.weights) == set(method_spec(cfg.method).terms)


def _base_of(space: Path) -> Path:
    """The base config of the header's ``tpr sweep CONFIG --space THIS`` command."""
    header = space.read_text().splitlines()[0]
    m = re.fullmatch(r"# tpr sweep (\S+\.yaml) --space (\S+\.yaml)\b.*", header)
    assert m, f"{space.name}: the first line should be the tpr sweep command, got {header!r}"
    assert m[2] == f"tune_spaces/{space.name}", header
    return REPO / m[1]


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_tune_space_loads_against_its_base_config(path: Path) -> None:
    base = load_config(_base_of(path))
    assert path.name.split("_")[0].removesuffix(".yaml") == base.method
    space = load_space(path, base)
    assert space.params
    terms = method_spec(base.method).terms
    for key in space.params:
        check_dotted_key(key)  # raises on an unknown key
        if key.startswith("loss.weights."):
            assert key.removeprefix("loss.weights.") in terms, (key, sorted(terms))
    # One trial at the first value of every distribution is a valid, checked config.
    first = {k: next(iter(dist.values()))[0] for k, dist in space.params.items()}
    trial = trial_config(base, first)
    assert trial.method == base.method
