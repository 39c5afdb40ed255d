"""How the command prints: rich on a terminal, plain text otherwise, JSON with ``--json``.

Three modes, picked once per command:

- **rich**: stdout is a terminal and ``NO_COLOR`` is unset (or empty): tables, colours
  and live progress drawn by ``rich``.
- **plain**: stdout is a pipe or a file, or ``NO_COLOR`` is set: no escape codes at all;
  tables are columns separated by two spaces (one row a line, so ``grep`` and ``cut``
  work), records are ``key: value`` lines.
- **json** (``--json``): a record is one JSON document; a listing is JSON lines, one
  object a line (``jq`` reads both; a listing streams, and an empty one prints nothing).

Errors always go to stderr as one line, ``agentflow: <ErrorType>: <what to do>``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any

from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

__all__ = ["STATUS_STYLE", "Output", "dumps", "error"]

#: The colour of each run status on a terminal.
STATUS_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "paused": "yellow",
    "waiting": "magenta",
    "completed": "green",
    "failed": "bold red",
    "stopped": "yellow",
    "rejected": "red",
    "expired": "red",
}


def dumps(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON text (what is not JSON, such as a datetime or a Decimal, as its ``str``)."""
    return json.dumps(value, indent=indent, default=str, ensure_ascii=False)


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))  # https://no-color.org: set and not empty


class Output:
    """Where a command prints, and in which of the three modes.

    Args:
        json: print JSON (``--json``).
        stream: stdout (a test may give another stream).
    """

    def __init__(self, json: bool = False, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.json = json
        isatty = getattr(self.stream, "isatty", None)
        self.rich = not json and bool(isatty and isatty()) and not _no_color()
        self.console = Console(file=self.stream, highlight=False, soft_wrap=not self.rich)

    # -- lines ------------------------------------------------------------------

    def line(self, text: str, markup: str | None = None) -> None:
        """Print ``text``; on a terminal ``markup`` (rich markup of the same words) instead."""
        if self.rich:
            self.console.print(markup if markup is not None else escape(text))
        else:
            print(text, file=self.stream, flush=True)

    def document(self, value: Any) -> None:
        """Print one JSON document."""
        print(dumps(value, indent=2), file=self.stream, flush=True)

    def json_line(self, value: Any) -> None:
        """Print one object of a JSON-lines listing."""
        print(dumps(value), file=self.stream, flush=True)

    # -- tables -----------------------------------------------------------------

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[str]],
        styles: Sequence[str | None] | None = None,
        title: str | None = None,
        empty: str = "nothing to list",
    ) -> None:
        """Print ``rows`` under ``columns``: a rich table on a terminal, aligned columns otherwise.

        ``styles`` gives each row a rich style (a status colour), on a terminal only. With
        no rows a terminal is told ``empty``; a pipe gets the header alone.
        """
        rows = [list(r) for r in rows]
        if self.rich and not rows:
            self.console.print(f"[dim]{escape(empty)}[/dim]")
            return
        if self.rich:
            table = Table(*columns, title=title, header_style="bold", box=None, pad_edge=False)
            for i, row in enumerate(rows):
                table.add_row(*(escape(c) for c in row), style=styles[i] if styles else None)
            self.console.print(table)
            return
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        for row in (list(columns), *rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=self.stream)
        self.stream.flush()

    def fields(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Print a record's fields, one ``key: value`` a line (the key bold on a terminal)."""
        pairs = list(pairs)
        width = max((len(k) for k, _ in pairs), default=0)
        for key, value in pairs:
            if self.rich:
                self.console.print(f"[bold]{escape(key)}:[/bold]{' ' * (width - len(key))} {escape(value)}")
            else:
                print(f"{key}:{' ' * (width - len(key))} {value}", file=self.stream)
        self.stream.flush()

    def value(self, title: str, value: Any) -> None:
        """A titled JSON value, indented under its title (highlighted on a terminal)."""
        if not self.rich:
            self.block(title, dumps(value, indent=2))
            return
        self.console.print(f"[bold]{escape(title)}:[/bold]")
        self.console.print(Padding(JSON(dumps(value), indent=2), (0, 0, 0, 2)))

    def block(self, title: str, text: str) -> None:
        """A titled block of several lines (a JSON value, a traceback), indented under its title."""
        if self.rich:
            self.console.print(f"[bold]{escape(title)}:[/bold]")
        else:
            print(f"{title}:", file=self.stream)
        for ln in text.splitlines() or [""]:
            if self.rich:
                self.console.print(f"  {escape(ln)}")
            else:
                print(f"  {ln}", file=self.stream)
        self.stream.flush()


def error(message: str) -> None:
    """Print an error line to stderr (never coloured: it is often read by a script)."""
    print(f"agentflow: {message}", file=sys.stderr, flush=True)
