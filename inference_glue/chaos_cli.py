"""The `p2pr chaos` command (the matrix itself is `inference_glue.chaos`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_commands"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _cmd_chaos(args: argparse.Namespace) -> int:
    from inference_glue.chaos import ROWS, run_chaos
    from inference_glue.cluster import ClusterStartError
    from inference_glue.commands import _model_or_exit
    from inference_glue.reference import ReferenceError

    err = Console(stderr=True)
    if args.list:
        for row in ROWS:
            print(f"{row.name:24} {row.faults or row.action}")
        return 0
    model_dir = _model_or_exit(args.model, "chaos")
    try:
        report = run_chaos(
            model_dir,
            tokens=args.tokens,
            only=args.only or (),
            progress=lambda line: err.print(f"chaos: {line}"),
        )
    except (ClusterStartError, ReferenceError, ValueError) as exc:
        print(f"p2pr chaos: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        table = Table(
            title=f"p2pr chaos: {report['model']}, 3 nodes, {report['tokens']} tokens per "
            f"generation, compared with single-device output"
        )
        columns = [
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
        for title, _ in columns:
            table.add_column(title, justify="left" if title == "row" else "right")
        for row in report["rows"]:
            table.add_row(*(_cell(row[key]) for _, key in columns))
        out = Console()
        if not out.is_terminal:
            out.width = 160  # a log or a pipe: do not fold the table to 80 columns
        out.print(table)
        for row in report["rows"]:
            if row["notes"] or row["error"]:
                out.print(f"  {row['name']}: {row['error'] or row['notes']}")
        worst = report["max_recover_s"]
        if worst is not None:
            verdict = "met" if worst <= report["recover_goal_s"] else "NOT met"
            out.print(
                f"slowest recovery after a SIGKILL: {worst:.2f} s "
                f"(goal <= {report['recover_goal_s']:.0f} s: {verdict})"
            )
        hang = report.get("max_hang_recover_s")
        if hang is not None:
            out.print(
                f"recovery from a hung (SIGSTOPped) stage: {hang:.2f} s (phi accrual + probe)"
            )
        out.print("every row passed" if report["passed"] else "[bold red]some rows FAILED[/]")
    print(json.dumps(report))
    return 0 if report["passed"] else 1


def add_commands(sub: Any, bench_sub: Any) -> None:
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
