"""`p2pr bench loss-sweep`: goodput and token latency against the rate of lost frames.

For each loss rate the fault shim (`router/faults.py`) drops that fraction of the frames every
node receives, and two things are measured on real py-libp2p hosts on 127.0.0.1:

- **goodput** of the reliable router: `router.bench.run_case` on a fresh cluster of
  `p2pr.bench.loadtest` processes (1 publisher, `receivers` receivers), one run per message size.
  A run publishes a fixed number of messages, so to keep each run near `seconds` long the
  count of a point is the goodput of the previous point (same size) times `seconds`.
- **token latency** of a pipeline generation: a `StageCluster` of `nodes` stage processes
  and a `PipelineClient`, all with the same drop rate, greedy, `tokens` tokens, one untimed
  warm-up request and `generations` timed ones. Per-token latency is the time between two
  consecutive token chunks reaching the client (p50/p99 over all timed requests); TTFT is
  the median time from the request to its first chunk. Every request's token ids are
  compared with the loss-free run's. Under heavy loss chunks wait for a repair and then
  arrive together, so p50 can drop below the loss-free value while p99 and tokens/s show
  the cost.

All of that runs `repeats` times, the rates interleaved (`p2pr.bench.repeats`): every figure
is the median over the rounds, with its spread (`key_spread`: `[min, max]`).

The shim's settings are fixed when a node starts (the engine only has a runtime hook for
partitions), so every loss rate gets fresh processes. The PNG has two panels: goodput, and
token latency (p50, p99, TTFT), against the loss rate (`p2pr.bench.lossplot`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import attrs

from p2p_reliable.health import nearest_rank
from p2pr.bench.nodes import LOADTEST
from p2pr.bench.repeats import DEFAULT_REPEATS, run_interleaved, summarize
from p2pr.bench.router import BenchCase, run_case

__all__ = [
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "SweepConfig",
    "measure_generation",
    "measure_goodput",
    "percent",
    "run_sweep",
    "size_label",
]

DEFAULT_RATES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)
DEFAULT_SIZES: tuple[int, ...] = (1024, 64 * 1024)
DEFAULT_PROMPT = "Once upon a time"
# The first goodput run of a size guesses its loss-free rate (measured here: ~7000 msg/s for
# 1 KiB, ~60 MB/s for 64 KiB); later runs use the previous point's measured rate.
_FIRST_GUESS_MSG_PER_S = 8000.0
_FIRST_GUESS_BYTES_PER_S = 60e6
_MIN_MESSAGES = 20


@attrs.frozen
class SweepConfig:
    """What the sweep measures, and how long it takes."""

    rates: tuple[float, ...] = DEFAULT_RATES
    sizes: tuple[int, ...] = DEFAULT_SIZES
    seconds: float = 2.0  # target length of one goodput run
    receivers: int = 1
    warmup: float = 1.0  # before publishing: gossipsub's mesh forms (1 s heartbeats)
    goodput_timeout: float = 60.0
    nodes: int = 2
    tokens: int = 32
    generations: int = 3  # timed requests per rate, after one warm-up request
    repeats: int = DEFAULT_REPEATS  # rounds over every rate, interleaved; medians over them
    prompt: str = DEFAULT_PROMPT
    generation_timeout: float = 120.0

    def __attrs_post_init__(self) -> None:
        if not self.rates:
            raise ValueError("no loss rates")
        if any(not 0.0 <= r < 1.0 for r in self.rates):
            raise ValueError("loss rates must be in [0, 1)")
        if not self.sizes or any(s < 64 for s in self.sizes):
            raise ValueError("message sizes must be at least 64 bytes")
        if self.tokens < 2 or self.generations < 1 or self.seconds <= 0 or self.repeats < 1:
            raise ValueError(
                "need at least 2 tokens, 1 generation, 1 round and a positive duration"
            )


def _faults(rate: float, seed: int) -> str | None:
    return f"drop={rate},seed={seed}" if rate > 0 else None


def measure_goodput(
    rate: float, size: int, messages: int, config: SweepConfig = SweepConfig()
) -> dict[str, Any]:
    """One goodput run of `messages` messages of `size` bytes through `rate` loss."""
    case = BenchCase(
        name=f"reliable {size} B, drop {rate}",
        module=LOADTEST,
        count=messages,
        size=size,
        receivers=config.receivers,
        faults=f"drop={rate}" if rate > 0 else "",
        warmup=config.warmup,
        timeout=config.goodput_timeout,
    )
    started = time.perf_counter()
    row = run_case(case)
    row["seconds"] = round(time.perf_counter() - started, 1)  # processes included
    del row["case"]
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def _generations(
    addrs: Sequence[str],
    model_dir: Path,
    rate: float,
    config: SweepConfig,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Warm-up plus timed requests; per request: token ids, chunk arrival times, error."""
    from inference_glue.client import PipelineClient, PipelineError, StageFailedError
    from inference_glue.tokens import IncompleteStreamError, TextMismatchError

    failures = (PipelineError, StageFailedError, IncompleteStreamError, TextMismatchError)
    runs: list[dict[str, Any]] = []
    stats: dict[str, Any] | None = None
    async with PipelineClient.connect(addrs, model_dir, faults=_faults(rate, 1000)) as client:
        prompt_ids = client.encode_prompt(config.prompt)
        for _ in range(1 + config.generations):
            ids: list[int] = []
            times: list[float] = []
            error: str | None = None
            start = time.perf_counter()
            with anyio.move_on_after(config.generation_timeout) as scope:
                try:
                    stream = client.stream(prompt_ids, config.tokens, idle_timeout=30.0)
                    async with aclosing(stream):
                        async for chunk in stream:
                            times.append(time.perf_counter())
                            ids.append(chunk.token_id)
                except failures as exc:
                    error = f"{type(exc).__name__}: {exc}"
            if scope.cancelled_caught:
                error = f"no complete answer within {config.generation_timeout:.0f} s"
            runs.append({"start": start, "times": times, "token_ids": ids, "error": error})
        try:
            stats = await client.stats(timeout=30)
        except PipelineError:
            stats = None  # counters are evidence, not the measurement
    return runs, stats


def measure_generation(
    model_dir: Path,
    rate: float,
    config: SweepConfig = SweepConfig(),
    reference: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """Start a pipeline whose nodes (and client) drop `rate` of their frames; generate.

    Returns the row's generation fields and the first request's token ids. `reference`:
    the loss-free token ids each request is compared with (default: the first request's).
    """
    from inference_glue.tokens import decode_rate
    from p2pr.stage_cluster import StageCluster

    cluster = StageCluster(model_dir, config.nodes, faults=_faults(rate, 7))
    with cluster.start(progress=progress):
        runs, stats = anyio.run(_generations, cluster.addrs, model_dir, rate, config)
    first_ids = list(runs[0]["token_ids"])
    expected = list(reference) if reference is not None else first_ids
    timed = runs[1:]
    gaps = sorted(b - a for r in timed for a, b in zip(r["times"], r["times"][1:]))
    ttfts = [r["times"][0] - r["start"] for r in timed if r["times"]]
    rates = (
        decode_rate(len(r["times"]), r["times"][0], r["times"][-1]) for r in timed if r["times"]
    )
    decode = [rate for rate in rates if rate is not None]
    errors = [r["error"] for r in runs if r["error"]]
    row: dict[str, Any] = {
        "requests": len(runs),
        "tokens": [len(r["token_ids"]) for r in runs],
        "completed": not errors,
        "matches_loss_free": not errors and all(r["token_ids"] == expected for r in runs),
        "ttft_ms": _ms(statistics.median(ttfts)) if ttfts else None,
        "token_latency_p50_ms": _ms(nearest_rank(gaps, 50)) if gaps else None,
        "token_latency_p99_ms": _ms(nearest_rank(gaps, 99)) if gaps else None,
        "token_latency_max_ms": _ms(gaps[-1]) if gaps else None,
        "decode_tokens_per_s": round(statistics.median(decode), 1) if decode else None,
        "errors": errors,
    }
    if stats is not None:
        # Evidence that the faults happened and were repaired: what the shims dropped and
        # what the protocol sent again, summed over every node and the client.
        row["frames_dropped"] = sum(n["shim"].get("dropped", 0) for n in stats["nodes"])
        row["retransmits"] = sum(link["retransmits"] for link in stats["links"])
        # Small latency-critical messages sent a second time (`LATENCY_STREAMS`).
        row["redundant_copies"] = sum(
            n["protocol"].get("redundant_copies", 0) for n in stats["nodes"]
        )
    return row, first_ids


# Medians over the rounds, each with a `_spread`: of a generation, and of a goodput point.
GENERATION_FIGURES = (
    "ttft_ms",
    "token_latency_p50_ms",
    "token_latency_p99_ms",
    "token_latency_max_ms",
    "decode_tokens_per_s",
    "frames_dropped",
    "retransmits",
    "redundant_copies",
)
GOODPUT_FIGURES = (
    "delivery_ratio",
    "goodput_msg_per_s",
    "goodput_mb_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "retransmits",
    "frames_dropped",
    "seconds",
)


def run_sweep(
    model_dir: Path,
    config: SweepConfig = SweepConfig(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`config.repeats` rounds over every loss rate (ascending): goodput per size, then a
    pipeline generation; per rate the medians and spreads over the rounds.

    The loss-free token ids come from rate 0 of the first round, or from an extra loss-free
    pipeline run when 0 is not among the rates.
    """
    say = progress or (lambda _: None)
    rates = sorted(set(config.rates))
    reference: list[int] | None = None
    if rates[0] > 0:
        say("loss-free reference generation")
        _, reference = measure_generation(model_dir, 0.0, attrs.evolve(config, generations=1))
    counts = _GoodputCounts(config)

    def measure(rate: float, round_index: int) -> dict[str, Any]:
        nonlocal reference
        goodput = [counts.measure(rate, size, round_index, say) for size in config.sizes]
        say(f"loss {percent(rate)}: pipeline of {config.nodes} stages, {config.tokens} tokens")
        generation, first_ids = measure_generation(
            model_dir, rate, config, reference, progress=lambda line: say(f"  {line}")
        )
        if reference is None:
            reference = first_ids  # rate 0 comes first
        return {"loss_rate": rate, "goodput": goodput, **generation}

    samples = run_interleaved(rates, config.repeats, measure, say, lambda r: f"loss {percent(r)}")
    rows = [_merge_rounds(rounds) for rounds in samples]
    return {
        "model": model_dir.name,
        "nodes": config.nodes,
        "tokens": config.tokens,
        "generations": config.generations,
        "repeats": config.repeats,
        "prompt": config.prompt,
        "sizes": list(config.sizes),
        "receivers": config.receivers,
        "seconds_per_goodput_run": config.seconds,
        "rows": rows,
        "all_complete": all(
            r["completed"]
            and r["matches_loss_free"]
            and all(g["delivery_ratio"] == 1.0 for g in r["goodput"])
            for r in rows
        ),
    }


class _GoodputCounts:
    """How many messages a goodput run publishes, to last about `config.seconds`.

    The first round sizes each point from the previous point's goodput (same size); later
    rounds publish what the first round did at that point, so that rounds compare.
    """

    def __init__(self, config: SweepConfig) -> None:
        self._config = config
        self._next = {
            size: max(
                _MIN_MESSAGES,
                int(min(_FIRST_GUESS_MSG_PER_S, _FIRST_GUESS_BYTES_PER_S / size) * config.seconds),
            )
            for size in config.sizes
        }
        self._chosen: dict[tuple[float, int], int] = {}

    def measure(
        self, rate: float, size: int, round_index: int, say: Callable[[str], None]
    ) -> dict[str, Any]:
        count = self._chosen.setdefault((rate, size), self._next[size])
        say(f"loss {percent(rate)}: goodput, {count} messages of {size} B")
        point = measure_goodput(rate, size, count, self._config)
        if round_index == 0 and point["goodput_msg_per_s"] > 0:
            self._next[size] = max(
                _MIN_MESSAGES, int(point["goodput_msg_per_s"] * self._config.seconds)
            )
        return point


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One loss rate's rows of every round: medians and spreads; a verdict over them all."""
    row = summarize(rounds, GENERATION_FIGURES)
    row["goodput"] = [
        summarize([r["goodput"][i] for r in rounds], GOODPUT_FIGURES, digits=4)
        for i in range(len(rounds[0]["goodput"]))
    ]
    row["requests"] = sum(r["requests"] for r in rounds)
    row["tokens"] = [n for r in rounds for n in r["tokens"]]
    row["errors"] = [e for r in rounds for e in r["errors"]]
    row["completed"] = all(r["completed"] for r in rounds)
    row["matches_loss_free"] = all(r["matches_loss_free"] for r in rounds)
    return row


def percent(rate: float) -> str:
    """0.05 -> '5%', 0.005 -> '0.5%'."""
    return f"{rate * 100:g}%"


def size_label(size: int) -> str:
    """'1 KiB', '64 KiB', '1 MiB', '100 B'."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"
