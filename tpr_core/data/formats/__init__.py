"""Raw dataset source formats, one module each, collected into :data:`FORMATS`.

Each module of this package whose name does not start with ``_`` defines ``SPEC``, its
:class:`FormatSpec`; a new source format is one new module. ``tpr data prepare``, the CLI's
``--format`` help and the ``data.format`` config field all take the names from :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
import pkgutil

from tpr_core.data.formats._spec import FormatSpec


def _collect() -> dict[str, FormatSpec]:
    """Every format module's ``SPEC``, keyed and ordered by name."""
    specs = [
        importlib.import_module(f"{__name__}.{m.name}").SPEC
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    ]
    table = {s.name: s for s in sorted(specs, key=lambda s: s.name)}
    if len(table) != len(specs):
        names = [s.name for s in specs]
        raise RuntimeError(f"two format modules in {__name__} declare the same name: {names}")
    return table


FORMATS: dict[str, FormatSpec] = _collect()

__all__ = ["FORMATS", "FormatSpec"]
