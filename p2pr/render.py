"""How a command speaks: tables for a person, one JSON line for a program, one-line errors.

Every command that measures or checks something ends with `emit`: unless `--json` was given,
its tables and lines for a person (on standard output), then always the whole result as one
JSON line, the last line of its output. Errors are one line on standard error (`fail`),
never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["console", "emit", "fail", "make_table", "one_line"]


def console(stderr: bool = False, width: int = 120) -> Console:
    """A console; a pipe or a log gets `width` columns rather than rich's 80."""
    out = Console(stderr=stderr)
    if not out.is_terminal:
        out.width = width
    return out


def make_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    left: Iterable[str] = (),
    caption: str | None = None,
) -> Table:
    """A table of `rows` under `columns` (right-aligned but for those in `left`)."""
    table = Table(title=title, caption=caption)
    keep_left = set(left)
    for column in columns:
        table.add_column(column, justify="left" if column in keep_left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def emit(
    result: Mapping[str, Any] | Sequence[Any],
    as_json: bool,
    *parts: Table | str,
    width: int = 120,
) -> None:
    """A command's output: unless `as_json`, `parts` (tables, lines with rich markup) for a
    person; then `result` as one JSON line."""
    if not as_json:
        out = console(width=width)
        for part in parts:
            out.print(part)
    print(json.dumps(result), flush=True)


def one_line(error: BaseException | str) -> str:
    """An error as one line: a multi-line message (a child's traceback) becomes its first
    line and its last, an exception group each of its leaves."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(one_line(leaf) for leaf in error.exceptions)
    text = str(error) if isinstance(error, str) else str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else text
    return f"{lines[0]} ... {lines[-1]}"


def fail(command: str, error: BaseException | str, code: int = 2) -> int:
    """Say `p2pr COMMAND: what went wrong` on standard error; `code`."""
    print(f"p2pr {command}: {one_line(error)}", file=sys.stderr)
    return code
