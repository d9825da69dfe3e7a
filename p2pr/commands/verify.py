"""`p2pr verify`: a fresh local pipeline against single-process mlx-lm, token for token.

p2pr verify [--nodes 2|3] [--max-tokens N] [--model DIR] [--json]
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ..models import model_option, model_or_exit, tokenizer_or_exit, untested_option
from ..render import console, emit, fail, one_line

__all__ = ["add_verify_command"]


def add_verify_command(sub: Any) -> None:
    """Register `p2pr verify`."""
    verify = sub.add_parser(
        "verify", help="the distributed pipeline against single-process mlx-lm, bit for bit"
    )
    verify.add_argument("--nodes", type=int, default=2, help="pipeline stages (processes)")
    verify.add_argument("--max-tokens", type=int, default=32)
    model_option(verify)
    verify.add_argument("--json", action="store_true", help="print only the JSON result")
    untested_option(verify)
    verify.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..reference import ReferenceError
    from ..stage_cluster import ClusterStartError
    from ..verify import run_verify

    err = console(stderr=True)
    model_dir = model_or_exit(args.model, "verify", args.allow_untested_architecture)
    tokenizer_or_exit(model_dir, "verify")
    label = "builtin" if args.model in (None, "builtin") else model_dir.name
    try:
        result = run_verify(
            model_dir,
            args.nodes,
            args.max_tokens,
            model_label=label,
            progress=lambda line: err.print(f"[dim]{line}[/]"),
        )
    except (ClusterStartError, ReferenceError, ValueError, OSError) as exc:
        return fail("verify", exc)
    except Exception as exc:  # one line, never a traceback (e.g. an ExceptionGroup)
        return fail("verify", f"{type(exc).__name__}: {one_line(exc)}")
    if not args.json:
        for row in result["rows"]:
            if row["error"]:
                err.print(f"[red]{row['prompt']} ({row['mode']}): {row['error']}[/]")
    emit(result, args.json, _table(result))
    return 0 if result["all_identical"] else 1


def _table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"p2pr verify: {result['model']}, {result['stages']} stages vs mlx-lm "
        f"stream_generate ({result['max_tokens']} tokens)"
    )
    for column in ("prompt", "mode", "tokens", "identical", "first divergence"):
        table.add_column(column, no_wrap=column == "prompt")
    for row in result["rows"]:
        table.add_row(
            row["prompt"],
            row["mode"],
            f"{row['reference_tokens']} / {row['pipeline_tokens']}",
            "[green]yes[/]" if row["identical"] else "[red]NO[/]",
            "" if row["first_divergence"] is None else str(row["first_divergence"]),
        )
    return table
