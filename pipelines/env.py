"""Process environment changes that are undone afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def scoped_env(**values: str | None) -> Iterator[None]:
    """Set (a string) or unset (``None``) environment variables for the duration of the block;
    each one gets back its previous value, or is removed if it had none, even on error."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _put(values)
        yield
    finally:
        _put(saved)


def _put(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
