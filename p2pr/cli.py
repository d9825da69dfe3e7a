"""`p2pr`: the command line of p2p-reliable.

Every command is registered here, in one place; each lives in its own module of
`p2pr.commands`, which imports what it needs (MLX above all) only when it runs, so that
`p2pr --help` and `p2pr node` start quickly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands.bench import add_bench_commands
from .commands.chaos import add_chaos_command
from .commands.demo import add_demo_command
from .commands.generate import add_generate_command
from .commands.health import add_health_command
from .commands.node import add_node_command
from .commands.pipeline import add_pipeline_command
from .commands.serve import add_serve_command
from .commands.verify import add_verify_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `p2pr`."""
    parser = argparse.ArgumentParser(prog="p2pr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_node_command(sub)
    add_serve_command(sub)
    add_health_command(sub)
    add_generate_command(sub)
    add_verify_command(sub)
    add_pipeline_command(sub)
    add_chaos_command(sub)
    add_bench_commands(sub)
    add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `p2pr` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
