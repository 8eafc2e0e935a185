"""How the ``tpr`` commands report an error the user can fix: one red line on stderr, an exit code."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)


def print_error(msg: str) -> None:
    """Print ``error: <msg>`` on stderr; the message is shown verbatim (brackets are not markup)."""
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print ``error: <msg>`` on stderr and end the command with exit ``code`` (2: usage or data error)."""
    print_error(msg)
    raise typer.Exit(code)
