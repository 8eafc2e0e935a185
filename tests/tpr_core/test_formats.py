"""tpr_core.data.formats: the one table of raw source formats, and what reads it."""

from __future__ import annotations

import pytest

from tpr_core.config import DataConfig
from tpr_core.data.formats import FORMATS, FormatSpec


def test_the_table_lists_exactly_the_three_source_formats() -> None:
    assert list(FORMATS) == ["cuhk-pedes", "icfg-pedes", "rstpreid"]
    assert all(isinstance(s, FormatSpec) and s.name == name for name, s in FORMATS.items())
    assert [n for n, s in FORMATS.items() if s.derives_val] == ["icfg-pedes"]


def test_config_accepts_the_table_and_synthetic_and_names_them_on_error() -> None:
    for name in ("synthetic", *FORMATS):
        assert DataConfig(format=name).format == name
    with pytest.raises(ValueError) as ei:
        DataConfig(format="market")
    assert all(f"'{name}'" in str(ei.value) for name in ("synthetic", *FORMATS))
