"""The progress display: one line redrawn on a terminal, a line per interval elsewhere, off on demand."""

from __future__ import annotations

import io

from tpr_core.progress import Progress, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_line_per_interval_and_a_closing_one(monkeypatch):
    monkeypatch.setenv("TPR_PROGRESS_INTERVAL_S", "0")
    out = io.StringIO()
    with Progress("checking images", 4, "images", stream=out) as p:
        for _ in range(4):
            p.advance()
    lines = out.getvalue().splitlines()
    assert [line.split(" s")[0].rsplit(" ", 1)[0] for line in lines] == [
        "checking images 1/4 images (25%)",
        "checking images 2/4 images (50%)",
        "checking images 3/4 images (75%)",
        "checking images 4/4 images (100%)",
        "checking images 4/4 images (100%)",  # the closing line
    ]


def test_off_a_terminal_a_short_step_prints_nothing(monkeypatch):
    monkeypatch.setenv("TPR_PROGRESS_INTERVAL_S", "30")
    out = io.StringIO()
    assert list(track(range(5), "indexing", stream=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""


def test_on_a_terminal_one_line_redrawn_in_place():
    out = _Tty()
    with Progress("evaluating", None, "items", stream=out) as p:
        p.advance(3)
    text = out.getvalue()
    assert "\n" not in text.rstrip("\n") and text.endswith("\n")
    assert text.startswith("\r\x1b[2K") and "evaluating 3 items" in text  # open count: no total, no %


def test_tpr_progress_0_turns_every_display_off(monkeypatch):
    monkeypatch.setenv("TPR_PROGRESS", "0")
    monkeypatch.setenv("TPR_PROGRESS_INTERVAL_S", "0")
    for out in (io.StringIO(), _Tty()):
        with Progress("writing shards", 2, "rows", stream=out) as p:
            p.advance(2)
        assert out.getvalue() == ""
