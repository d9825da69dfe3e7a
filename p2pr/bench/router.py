"""`p2pr bench router`: bare gossipsub against the reliable router, 3 processes on loopback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .nodes import LOADTEST, RAWGOSSIP, LocalCluster
from .repeats import DEFAULT_REPEATS, run_interleaved, summarize


@attrs.frozen
class BenchCase:
    """One row: who publishes what, how."""

    name: str
    module: str
    count: int
    size: int
    mode: str = "topic"
    rate: float = 0.0
    receivers: int = 2
    # Fault shim of every node (the loadtest nodes only), e.g. "drop=0.1": each node gets its own
    # seed, so that the nodes do not drop in lockstep.
    faults: str = ""
    warmup: float = 1.5
    # How long a node waits for everything to arrive (and to be acknowledged) before it reports.
    timeout: float = 120.0
    # Where each node's engine runs (RouterConfig.engine_loop; the loadtest nodes only).
    engine_loop: str = "thread"


def run_case(case: BenchCase) -> dict[str, Any]:
    """Run one case on a fresh cluster (1 publisher, `case.receivers` receivers)."""
    common = [f"--size={case.size}", f"--peers={case.receivers}"]
    extra = [
        f"--mode={case.mode}",
        f"--rate={case.rate}",
        f"--warmup={case.warmup}",
        f"--timeout={case.timeout}",
        f"--engine-loop={case.engine_loop}",
    ]
    if case.module == RAWGOSSIP:
        extra = []

    def faults(index: int) -> list[str]:
        return [f"--faults={case.faults},seed={index + 1}"] if case.faults else []

    with LocalCluster(module=case.module) as cluster:
        cluster.start(["--index=0", f"--publish={case.count}", *common, *extra, *faults(0)])
        for index in range(1, case.receivers + 1):
            cluster.start(
                [
                    f"--index={index}",
                    "--expect=1",
                    f"--expect-count={case.count}",
                    *common,
                    *extra,
                    *faults(index),
                ]
            )
        publisher, *receivers = cluster.results(timeout=max(600, 3 * case.timeout))
    expected = case.count * len(receivers)
    delivered = sum(r["received"] for r in receivers)
    spans = [r["last_arrival"] - publisher["first_send"] for r in receivers if r["last_arrival"]]
    span = max(spans) if spans else float("nan")
    per_receiver = delivered / len(receivers)
    p50s, p99s = zip(*(_latencies(r) for r in receivers))
    return {
        "case": case.name,
        "size_bytes": case.size,
        "messages": case.count,
        "delivery_ratio": round(delivered / expected, 4),
        "goodput_msg_per_s": round(per_receiver / span, 1),
        "goodput_mb_per_s": round(per_receiver * case.size / span / 1e6, 2),
        "latency_p50_ms": _ms(max(p50s)),
        "latency_p99_ms": _ms(max(p99s)),
        "retransmits": publisher.get("protocol", {}).get("retransmits"),
        # Frames the fault shims dropped, on every node (acks and repairs included).
        "frames_dropped": sum(r.get("shim", {}).get("dropped", 0) for r in [publisher, *receivers]),
    }


def _latencies(result: dict[str, Any]) -> tuple[float | None, float | None]:
    if "latency_p50" in result:
        return result["latency_p50"], result["latency_p99"]
    tallies = [t for p, t in result["per_publisher"].items() if p != "-1"]
    if not tallies:
        return None, None
    return tallies[0]["latency_p50"], tallies[0]["latency_p99"]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


CASES = [
    BenchCase("raw gossipsub 1 KiB", RAWGOSSIP, 1500, 1024),
    BenchCase("reliable 1 KiB", LOADTEST, 10_000, 1024),
    BenchCase("raw gossipsub 256 KiB", RAWGOSSIP, 150, 256 * 1024),
    BenchCase("reliable 256 KiB", LOADTEST, 300, 256 * 1024),
    BenchCase("reliable point-to-point 64 B, 200/s", LOADTEST, 600, 64, "direct", 200),
    BenchCase(
        "reliable point-to-point 64 B, 200/s, engine on the app's loop",
        LOADTEST,
        600,
        64,
        "direct",
        200,
        engine_loop="shared",
    ),
]


# The figures of a row that vary from run to run: medians and spreads over the rounds.
ROW_FIGURES = (
    "delivery_ratio",
    "goodput_msg_per_s",
    "goodput_mb_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "retransmits",
    "frames_dropped",
)


def bench_router(
    cases: list[BenchCase] | None = None,
    progress: Callable[[str], None] | None = None,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, Any]:
    """Every case once per round, `repeats` rounds, plus the goal checks (on the medians)."""
    chosen = cases or CASES
    samples = run_interleaved(
        chosen, repeats, lambda case, _: run_case(case), progress, lambda case: case.name
    )
    rows = [summarize(runs, ROW_FIGURES, digits=4) for runs in samples]
    by_name = {r["case"]: r for r in rows}
    summary: dict[str, Any] = {"repeats": repeats, "rows": rows}
    for size in ("1 KiB", "256 KiB"):
        raw, rel = by_name.get(f"raw gossipsub {size}"), by_name.get(f"reliable {size}")
        if raw and rel and raw["goodput_msg_per_s"]:
            summary[f"reliable_over_raw_{size.replace(' ', '').lower()}"] = round(
                rel["goodput_msg_per_s"] / raw["goodput_msg_per_s"], 2
            )
    return summary
