"""One progress display per long step (preparing data, encoding a split, indexing a gallery,
the steps of a training epoch), on stderr so that stdout keeps only results.

On a terminal the display is one line redrawn in place. Elsewhere (a log file, a pipe, a Ray
worker whose output the driver relays line by line) a redrawn line would become hundreds of
lines: the display then prints one line every ``interval_s`` seconds (``TPR_PROGRESS_INTERVAL_S``,
default 30), and a closing line only if it printed any, so a short step prints nothing.

``TPR_PROGRESS=0`` turns every display off (``tpr -q`` sets it; Ray workers inherit it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

_REDRAW_S = 0.1  # a terminal line is redrawn at most this often


def enabled() -> bool:
    """Whether progress displays are on (``TPR_PROGRESS`` is not ``0``)."""
    return os.environ.get("TPR_PROGRESS", "1") != "0"


def _interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("TPR_PROGRESS_INTERVAL_S", "30")))
    except ValueError:
        return 30.0


class Progress:
    """A counter of ``total`` items (or an open count) for one step, shown on ``stream``.

    Args:
        label: what is being done ("checking images").
        total: items expected, or None when unknown.
        unit: what an item is ("images"), printed after the count.
        stream: where to draw (default ``sys.stderr``).
        live: redraw one line in place (default: when ``stream`` is a terminal).
        show: draw at all (default: :func:`enabled`).
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "",
        stream: IO[str] | None = None,
        live: bool | None = None,
        show: bool | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._live = live if live is not None else bool(getattr(self._stream, "isatty", lambda: False)())
        self._show = enabled() if show is None else show
        self._start = self._last = time.monotonic()
        self._interval = _REDRAW_S if self._live else _interval_s()
        self._printed = False

    def text(self) -> str:
        """The display's current line, e.g. ``checking images 120/400 images (30%) 4.2 s``."""
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.label} {count}{unit}{pct} {time.monotonic() - self._start:.1f} s"

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items; redraw when due."""
        self.done += n
        now = time.monotonic()
        if self._show and now - self._last >= self._interval:
            self._last = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        if self._live:
            self._stream.write(f"\r\x1b[2K{self.text()}{end}")
        else:
            self._stream.write(self.text() + "\n")
        self._stream.flush()
        self._printed = True

    def close(self) -> None:
        """End the display: the final count on a terminal; off a terminal, a closing line if
        an interim one was printed."""
        if not self._show:
            return
        if self._live:
            self._draw(end="\n")
        elif self._printed:
            self._draw()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    items: Iterable[T], label: str, total: int | None = None, unit: str = "", stream: IO[str] | None = None
) -> Iterator[T]:
    """Yield ``items``, counting each on a :class:`Progress` (``total`` default ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(label, total, unit, stream=stream) as p:
        for item in items:
            yield item
            p.advance()
