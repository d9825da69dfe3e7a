"""`p2pr chaos`: the fault matrix over local 3-process pipelines (the matrix itself is
`p2pr.chaos`)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from ..render import emit, fail, make_table

__all__ = ["add_chaos_command"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _cmd_chaos(args: argparse.Namespace) -> int:
    from ..chaos import ROWS, run_chaos
    from ..models import model_or_exit
    from ..reference import ReferenceError
    from ..stage_cluster import ClusterStartError

    err = Console(stderr=True)
    if args.list:
        for row in ROWS:
            print(f"{row.name:24} {row.faults or row.action}")
        return 0
    model_dir = model_or_exit(args.model, "chaos")
    try:
        report = run_chaos(
            model_dir,
            tokens=args.tokens,
            only=args.only or (),
            progress=lambda line: err.print(f"chaos: {line}"),
        )
    except (ClusterStartError, ReferenceError, ValueError) as exc:
        return fail("chaos", exc)
    emit(report, args.json, _table(report), *_notes(report), width=160)
    return 0 if report["passed"] else 1


_COLUMNS = [
    ("row", "name"),
    ("sent", "sent"),
    ("delivered", "delivered"),
    ("retransmits", "retransmits"),
    ("corrupt rejected", "corrupt_rejected"),
    ("dups delivered", "duplicates_delivered"),
    ("corrupt accepted", "corrupted_accepted"),
    ("identical", "identical"),
    ("longest stall s", "stall_s"),
    ("recover s", "recover_s"),
    ("pass", "passed"),
]


def _table(report: dict[str, Any]) -> Table:
    title = (
        f"p2pr chaos: {report['model']}, 3 nodes, {report['tokens']} tokens per "
        f"generation, compared with single-device output"
    )
    rows = [[_cell(row[key]) for _, key in _COLUMNS] for row in report["rows"]]
    return make_table(title, [title for title, _ in _COLUMNS], rows, left=["row"])


def _notes(report: dict[str, Any]) -> list[str]:
    notes = [
        f"  {row['name']}: {row['error'] or row['notes']}"
        for row in report["rows"]
        if row["notes"] or row["error"]
    ]
    worst = report["max_recover_s"]
    if worst is not None:
        verdict = "met" if worst <= report["recover_goal_s"] else "NOT met"
        notes.append(
            f"slowest recovery after a SIGKILL: {worst:.2f} s "
            f"(goal <= {report['recover_goal_s']:.0f} s: {verdict})"
        )
    hang = report.get("max_hang_recover_s")
    if hang is not None:
        notes.append(f"recovery from a hung (SIGSTOPped) stage: {hang:.2f} s (phi accrual + probe)")
    notes.append("every row passed" if report["passed"] else "[bold red]some rows FAILED[/]")
    return notes


def add_chaos_command(sub: Any) -> None:
    """Register `p2pr chaos`."""
    chaos = sub.add_parser(
        "chaos",
        help="fault matrix over a local 3-node pipeline (drop, dup, reorder, delay, corrupt, "
        "partition, SIGKILL, restart)",
    )
    chaos.add_argument("--json", action="store_true", help="print only the JSON report")
    chaos.add_argument(
        "--model", default="tiny", help="tiny (default), builtin, or an mlx-lm directory"
    )
    chaos.add_argument("--tokens", type=int, default=48, help="tokens per generation")
    chaos.add_argument(
        "--only", action="append", help="run the rows whose name contains this (repeatable)"
    )
    chaos.add_argument("--list", action="store_true", help="list the rows and exit")
    chaos.set_defaults(func=_cmd_chaos)
