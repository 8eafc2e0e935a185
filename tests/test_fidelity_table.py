"""docs/fidelity.md and the base configs agree, so the table cannot drift.

The table's contract: one ``## <method>`` section per method; in its tables, a row whose first
cell names a config key in backticks (``loss.a_sdm_form``) gives tpr's default in its fourth
cell, in backticks: one YAML value for the three base configs of the method, or
``cuhk: V; icfg: V; rstp: V``. Every such row is checked against
``pipelines/configs/<method>_{cuhk,icfg,rstp}_base.yaml``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tpr_core.config import ConfigError, check_dotted_key, flatten
from tpr_core.experiment import load_config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "fidelity.md"
METHODS = ("irra", "fmfa", "uit", "ivt")
DATASETS = ("cuhk", "icfg", "rstp")
# Each method's table must cover at least these keys.
REQUIRED = {
    "irra": {"loss.gather", "optim.name", "optim.lr", "optim.eps", "optim.schedule_unit", "data.batch_size"},
    "fmfa": {"loss.a_sdm_form", "loss.efa_form", "loss.gather", "optim.name", "optim.lr", "data.batch_size"},
    "uit": {"loss.weights.triplet", "loss.weights.restore", "data.sampler", "data.batch_size", "optim.name"},
    "ivt": {"loss.mla_form", "loss.cmpm_label_norm", "loss.gather", "optim.name", "optim.lr", "data.batch_size"},
}


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## +(\w+)\s*$", text, flags=re.M)
    return {parts[i].lower(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _rows(section: str) -> list[tuple[str, str]]:
    """(config key, tpr default cell) of every table row that names a config key."""
    out = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = re.match(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", cells[0])
        if key and len(cells) >= 4:
            out.append((key.group(1), cells[3]))
    return out


def _expected(cell: str) -> dict[str, object]:
    m = re.search(r"`([^`]*)`", cell)
    assert m, f"no backticked value in {cell!r}"
    text = m.group(1)
    if re.fullmatch(r"\s*cuhk:.*;\s*icfg:.*;\s*rstp:.*", text):
        return {k.strip(): yaml.safe_load(v) for k, v in (p.split(":", 1) for p in text.split(";"))}
    value = yaml.safe_load(text)
    return dict.fromkeys(DATASETS, value)


def _same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def sections() -> dict[str, str]:
    assert DOC.is_file(), "docs/fidelity.md is missing"
    return _sections(DOC.read_text())


def _configs(method: str) -> dict[str, dict]:
    return {
        ds: flatten(load_config(REPO / "pipelines" / "configs" / f"{method}_{ds}_base.yaml").model_dump(mode="json"))
        for ds in DATASETS
    }


def _mismatches(method: str, rows: list[tuple[str, str]], configs: dict[str, dict]) -> list[str]:
    bad = []
    for key, cell in rows:
        try:
            check_dotted_key(key)
        except ConfigError:
            bad.append(f"{method}: the table names {key!r}, which is not a config key")
            continue
        want = _expected(cell)
        for ds in DATASETS:
            got = configs[ds].get(key)
            if not _same(got, want[ds]):
                bad.append(f"{method} {ds}: {key} is {got!r} in the config, {want[ds]!r} in the table")
    return bad


@pytest.mark.parametrize("method", METHODS)
def test_table_matches_the_base_configs(sections: dict[str, str], method: str) -> None:
    assert method in sections, f"docs/fidelity.md has no '## {method}' section"
    rows = _rows(sections[method])
    missing = REQUIRED[method] - {k for k, _ in rows}
    assert not missing, f"{method}: the table has no row for {sorted(missing)}"
    bad = _mismatches(method, rows, _configs(method))
    assert not bad, "\n".join(bad)


def test_a_drifted_row_is_caught() -> None:
    """The check bites: a row whose value, per-dataset value or key disagrees is reported."""
    section = "\n".join([
        "| setting | paper | code | tpr default | switch | why |",
        "|---|---|---|---|---|---|",
        "| `loss.a_sdm_form` | - | - | `paper` | - | - |",
        "| `loss.a_sdm_alpha` | - | - | `cuhk: 10.0; icfg: 10.0; rstp: 10.0` | - | - |",
        "| `loss.no_such_key` | - | - | `1` | - | - |",
    ])
    bad = _mismatches("fmfa", _rows(section), _configs("fmfa"))
    assert len(bad) == 5, bad  # a_sdm_form x 3 datasets, RSTPReid's alpha (1.0), the unknown key
