"""Text facts shared by data preparation and serving."""

from __future__ import annotations

import unicodedata

# Letters and symbols that render as nothing (Hangul fillers, the blank Braille pattern).
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace, control and format characters (zero-width
    spaces and joiners, BOM, soft hyphen, ...) and blank glyphs."""
    return all(
        c.isspace() or c in _BLANK_GLYPHS or unicodedata.category(c) in ("Cc", "Cf") for c in text
    )
