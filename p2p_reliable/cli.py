"""`p2pr`: the command line of p2p-reliable."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

# Modules with `add_commands(subparsers, bench_subparsers)`.
COMMAND_MODULES: list[str] = [
    "discovery.commands",
    "inference_glue.commands",
    "inference_glue.chaos_cli",
]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_codec

    result = bench_codec(messages=args.messages)
    if not args.json:
        table = Table(title="p2pr bench codec")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_column("target", justify="right")
        table.add_row(
            "encode+checksum+decode, 1 KiB message",
            f"{result['encode_decode_us_per_1kib']:.2f} µs",
            "≤ 15 µs",
        )
        table.add_row("  encode alone", f"{result['encode_us_per_1kib']:.2f} µs", "")
        table.add_row("  decode (verify) alone", f"{result['decode_us_per_1kib']:.2f} µs", "")
        table.add_row("wire size of a 1 KiB message", f"{result['wire_bytes_per_1kib']} B", "")
        table.add_row("xxh3-64 over 1 MiB", f"{result['checksum_gb_per_s']:.1f} GB/s", "≥ 5 GB/s")
        Console().print(table)
    print(json.dumps(result))
    return 0


def _cmd_bench_router(args: argparse.Namespace) -> int:
    from router.bench import bench_router

    console = Console(stderr=True)
    result = bench_router(progress=lambda name: console.print(f"running: {name}…"))
    if not args.json:
        table = Table(title="p2pr bench router (3 processes on 127.0.0.1, 1 publisher)")
        for column in (
            "case",
            "delivered",
            "goodput msg/s",
            "MB/s",
            "p50 ms",
            "p99 ms",
            "retransmits",
        ):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            table.add_row(
                row["case"],
                f"{row['delivery_ratio']:.2%}",
                f"{row['goodput_msg_per_s']:.0f}",
                f"{row['goodput_mb_per_s']:.2f}",
                str(row["latency_p50_ms"]),
                str(row["latency_p99_ms"]),
                "" if row["retransmits"] is None else str(row["retransmits"]),
            )
        Console().print(table)
        Console().print(
            "latency of bulk rows is under full load (queueing included); the point-to-point "
            "row is paced"
        )
    print(json.dumps(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .simdemo import run_demo

    console = Console()
    console.print(
        f"Simulating {args.nodes} nodes, each publishing {args.messages} messages to all "
        f"others, over links with {args.loss:.0%} loss and {args.corrupt:.0%} corruption "
        "(plus 5% duplication and 10% reordering), in virtual time…"
    )
    result = run_demo(
        nodes=args.nodes,
        messages=args.messages,
        loss=args.loss,
        corrupt=args.corrupt,
        seed=args.seed,
    )
    table = Table(title="simulated exchange")
    for column in (
        "node",
        "sent",
        "delivered",
        "dups\nsuppressed",
        "corrupt\nrejected",
        "retrans-\nmits",
        "NACKs",
        "in\norder",
    ):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(
            row.node,
            str(row.sent),
            str(row.delivered),
            str(row.duplicates_suppressed),
            str(row.corrupted_rejected),
            str(row.retransmits),
            str(row.nacks),
            "yes" if row.in_order else "NO",
        )
    console.print(table)
    console.print(
        f"network: {result.frames} frames, {result.frames_dropped} dropped, "
        f"{result.frames_corrupted} corrupted; {result.virtual_seconds} s of virtual time"
    )
    if result.complete:
        console.print("[green]every message delivered exactly once, in order, uncorrupted[/]")
        return 0
    console.print("[red]delivery incomplete[/]")
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `p2pr`."""
    parser = argparse.ArgumentParser(prog="p2pr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="micro-benchmarks (print a table and JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    codec = bench_sub.add_parser("codec", help="envelope encode/decode and checksum speed")
    codec.add_argument("--json", action="store_true", help="print only the JSON result")
    codec.add_argument("--messages", type=int, default=50_000)
    codec.set_defaults(func=_cmd_bench)
    router = bench_sub.add_parser("router", help="bare gossipsub vs the reliable router")
    router.add_argument("--json", action="store_true", help="print only the JSON result")
    router.set_defaults(func=_cmd_bench_router)

    demo = sub.add_parser("demo", help="simulated 3-node exchange through loss and corruption")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--messages", type=int, default=200)
    demo.add_argument("--loss", type=float, default=0.2)
    demo.add_argument("--corrupt", type=float, default=0.02)
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=_cmd_demo)
    # Each package adds its own commands (one module each, so they evolve independently).
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `p2pr` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
