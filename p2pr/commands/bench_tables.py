"""The tables of `p2pr bench generate` and `p2pr bench loss-sweep`."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..bench.losssweep import percent, size_label
from ..bench.repeats import with_spread

__all__ = ["api_tables", "failover_table", "generate_table", "loss_sweep_table"]


def _cell(row: dict[str, Any], key: str, fmt: str = "{:g}") -> str:
    """The median, and under it the spread (wide tables stay within the console)."""
    return with_spread(row, key, fmt, sep="\n")


def generate_table(result: dict[str, Any]) -> Table:
    """One row per configuration: decode and end-to-end speed, costs, identity."""
    table = Table(
        title=f"p2pr bench generate: {result['model']}, {result['max_tokens']} tokens, "
        f"greedy, median (min–max) of {result['repeats']} interleaved rounds of "
        f"{result['runs']} runs ({result['blas']})"
    )
    for column in (
        "configuration",
        "decode tok/s",
        "vs single",
        "TTFT ms",
        "end-to-end tok/s",
        "compute ms/token",
        "messaging ms/token",
        "aggregate tok/s (requests at once)",
        "identical",
    ):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            row["config"],
            _cell(row, "decode_tokens_per_s", "{:.2f}"),
            _cell(row, "vs_single", "{:.3f}"),
            _cell(row, "ttft_ms", "{:.1f}"),
            _cell(row, "e2e_tokens_per_s", "{:.2f}"),
            _cell(row, "compute_ms_per_token", "{:.2f}"),
            _cell(row, "messaging_ms_per_token", "{:.2f}"),
            f"{_cell(row, 'aggregate_tokens_per_s', '{:.2f}')}\n(x{row['concurrent_requests']})"
            if row.get("aggregate_tokens_per_s") is not None
            else "",
            "yes" if row["identical_to_single"] else "NO",
        )
    return table


def loss_sweep_table(result: dict[str, Any]) -> Table:
    """One row per loss rate: goodput per message size, token latency, identity."""
    receivers = f"{result['receivers']} receiver{'s' * (result['receivers'] > 1)}"
    table = Table(
        title=f"p2pr bench loss-sweep: goodput (1 publisher, {receivers}) and "
        f"{result['model']} over {result['nodes']} stages ({result['tokens']} tokens, "
        f"{result['generations']} timed requests) against dropped frames; "
        f"median (min–max) of {result['repeats']} interleaved rounds"
    )
    table.add_column("loss", justify="right")
    for size in result["sizes"]:
        table.add_column(f"{size_label(size)}\nMB/s", justify="right")
    for column in ("TTFT ms", "token p50 ms", "token p99 ms", "tok/s", "complete, same"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        same = row["completed"] and row["matches_loss_free"]
        table.add_row(
            percent(row["loss_rate"]),
            *(
                f"{_cell(g, 'goodput_mb_per_s', '{:.2f}')}\n{g['goodput_msg_per_s']:.0f} msg/s"
                + ("" if g["delivery_ratio"] == 1.0 else f" [red]{g['delivery_ratio']:.1%}[/]")
                for g in row["goodput"]
            ),
            _cell(row, "ttft_ms"),
            _cell(row, "token_latency_p50_ms"),
            _cell(row, "token_latency_p99_ms"),
            _cell(row, "decode_tokens_per_s"),
            "yes" if same else "[red]NO[/]",
        )
    return table


def failover_table(result: dict[str, Any]) -> Table:
    """One row per kill point: where the time from the kill to the next token went."""
    table = Table(
        title=f"p2pr bench failover: {result['model']}, {result['stages']} stages, SIGKILL "
        f"mid-answer; median (min–max) of {result['repeats']} interleaved rounds, seconds"
    )
    for column in (
        "stage killed",
        "after token",
        "kill → next token",
        "kill → resumed token",
        "kill → detected",
        "re-plan",
        "detected → resumed token",
        "identical",
    ):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            f"{row['victim']} ({row['victim_stage']})",
            f"{row['after_token']} of {row['tokens']}",
            _cell(row, "kill_to_next_token_s", "{:.3f}"),
            _cell(row, "kill_to_resumed_s", "{:.3f}"),
            _cell(row, "detect_s", "{:.3f}"),
            _cell(row, "replan_s", "{:.3f}"),
            _cell(row, "resume_s", "{:.3f}"),
            "yes" if row["identical"] else "[red]NO[/]",
        )
    return table


def api_tables(result: dict[str, Any]) -> tuple[Table, Table]:
    """`p2pr bench api`: one row per way in, then one per number of streaming clients."""
    ways = Table(
        title=f"p2pr bench api: {result['model']}, {result['prompt_tokens']} prompt tokens, "
        f"{result['max_tokens']} new, greedy, median (min-max) of {result['runs']} runs; "
        f"API / generate = {result['api_vs_generate']} (goal >= 0.97)"
    )
    for column in ("way", "decode tok/s", "TTFT ms", "same text"):
        ways.add_column(column, justify="right")
    for row in result["rows"]:
        low, high = row["decode_min_max"] or ("", "")
        first, last = row["ttft_min_max_ms"] or ("", "")
        ways.add_row(
            row["way"],
            f"{row['decode_tokens_per_s']} ({low}-{high})",
            f"{row['ttft_ms']} ({first}-{last})",
            "yes" if row["same_text"] else "NO",
        )
    clients = Table(title="streaming clients at once through the API (2 stages)")
    for column in ("clients", "aggregate tok/s", "median TTFT ms", "same text"):
        clients.add_column(column, justify="right")
    for row in result["concurrency"]:
        clients.add_row(
            str(row["clients"]),
            str(row["aggregate_tokens_per_s"]),
            str(row["ttft_ms"]),
            "yes" if row["same_text"] else "NO",
        )
    return ways, clients
