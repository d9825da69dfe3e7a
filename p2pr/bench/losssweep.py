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

The shim's settings are fixed when a node starts (the engine only has a runtime hook for
partitions), so every loss rate gets fresh processes. The PNG has two panels: goodput, and
token latency (p50, p99, TTFT), against the loss rate; matplotlib (the `plot` extra) draws it
with the Agg backend.
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
from p2pr.bench.router import BenchCase, run_case

__all__ = [
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "PlotUnavailableError",
    "SweepConfig",
    "measure_generation",
    "measure_goodput",
    "percent",
    "require_matplotlib",
    "run_sweep",
    "size_label",
    "write_plot",
]

DEFAULT_RATES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)
DEFAULT_SIZES: tuple[int, ...] = (1024, 64 * 1024)
DEFAULT_PROMPT = "Once upon a time"
# The first goodput run of a size guesses its loss-free rate (measured here: ~7000 msg/s for
# 1 KiB, ~60 MB/s for 64 KiB); later runs use the previous point's measured rate.
_FIRST_GUESS_MSG_PER_S = 8000.0
_FIRST_GUESS_BYTES_PER_S = 60e6
_MIN_MESSAGES = 20


class PlotUnavailableError(RuntimeError):
    """matplotlib, which draws the PNG, is not installed."""


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
    prompt: str = DEFAULT_PROMPT
    generation_timeout: float = 120.0

    def __attrs_post_init__(self) -> None:
        if not self.rates:
            raise ValueError("no loss rates")
        if any(not 0.0 <= r < 1.0 for r in self.rates):
            raise ValueError("loss rates must be in [0, 1)")
        if not self.sizes or any(s < 64 for s in self.sizes):
            raise ValueError("message sizes must be at least 64 bytes")
        if self.tokens < 2 or self.generations < 1 or self.seconds <= 0:
            raise ValueError("need at least 2 tokens, 1 generation and a positive duration")


def require_matplotlib() -> None:
    """Raise `PlotUnavailableError` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError(
            "matplotlib is not installed; it comes with the 'plot' extra: "
            "pip install -e '.[plot]' (scripts/setup.sh installs it)"
        ) from None


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
    return row, first_ids


def run_sweep(
    model_dir: Path,
    config: SweepConfig = SweepConfig(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every loss rate in turn (ascending): goodput per size, then a pipeline generation.

    The loss-free token ids come from rate 0, or from an extra loss-free pipeline run when
    0 is not among the rates.
    """
    say = progress or (lambda _: None)
    rates = sorted(set(config.rates))
    reference: list[int] | None = None
    if rates[0] > 0:
        say("loss-free reference generation")
        _, reference = measure_generation(model_dir, 0.0, attrs.evolve(config, generations=1))
    counts = {
        size: max(
            _MIN_MESSAGES,
            int(min(_FIRST_GUESS_MSG_PER_S, _FIRST_GUESS_BYTES_PER_S / size) * config.seconds),
        )
        for size in config.sizes
    }
    rows: list[dict[str, Any]] = []
    for rate in rates:
        goodput = []
        for size in config.sizes:
            say(f"loss {percent(rate)}: goodput, {counts[size]} messages of {size} B")
            point = measure_goodput(rate, size, counts[size], config)
            goodput.append(point)
            if point["goodput_msg_per_s"] > 0:
                counts[size] = max(_MIN_MESSAGES, int(point["goodput_msg_per_s"] * config.seconds))
        say(f"loss {percent(rate)}: pipeline of {config.nodes} stages, {config.tokens} tokens")
        generation, first_ids = measure_generation(
            model_dir, rate, config, reference, progress=lambda line: say(f"  {line}")
        )
        if reference is None:
            reference = first_ids  # rate 0 comes first
        rows.append({"loss_rate": rate, "goodput": goodput, **generation})
    return {
        "model": model_dir.name,
        "nodes": config.nodes,
        "tokens": config.tokens,
        "generations": config.generations,
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


def percent(rate: float) -> str:
    """0.05 -> '5%', 0.005 -> '0.5%'."""
    return f"{rate * 100:g}%"


def size_label(size: int) -> str:
    """'1 KiB', '64 KiB', '1 MiB', '100 B'."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def write_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Draw the sweep as a PNG: goodput, and token latency, against the loss rate."""
    require_matplotlib()
    # The Figure API with an explicit Agg canvas: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _plot_goodput(left, result)
    _plot_latency(right, result)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _log_scale(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # Plain numbers at 1-2-5 steps: ranges here often span less than a decade.
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_goodput(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    loss = [100 * r["loss_rate"] for r in rows]
    for i, size in enumerate(result["sizes"]):
        values = [r["goodput"][i]["goodput_mb_per_s"] for r in rows]
        ax.plot(loss, values, marker="o", label=f"{size_label(size)} messages")
    if all(g["goodput_mb_per_s"] > 0 for r in rows for g in r["goodput"]):
        _log_scale(ax)  # sizes differ by an order of magnitude, and so does loss
    receivers = result["receivers"]
    ax.set_title(
        f"reliable router goodput (1 publisher, {receivers} receiver{'s' * (receivers > 1)})"
    )
    ax.set_xlabel("frames dropped (%)")
    ax.set_ylabel("goodput (MB/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _plot_latency(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    loss = [100 * r["loss_rate"] for r in rows]
    plotted: list[float] = []
    for key, label, style in (
        ("token_latency_p50_ms", "per-token p50", "o-"),
        ("token_latency_p99_ms", "per-token p99", "s-"),
        ("ttft_ms", "time to first token (median)", "^--"),
    ):
        points = [(x, r[key]) for x, r in zip(loss, rows) if r[key] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, label=label)
            plotted.extend(ys)
    if plotted and min(plotted) > 0:
        _log_scale(ax)  # p99 under loss is a multiple of the RTO, p50 a few ms
    bad = [(x, r) for x, r in zip(loss, rows) if not (r["completed"] and r["matches_loss_free"])]
    for x, _ in bad:
        ax.axvline(x, color="red", alpha=0.4)
    ax.set_title(
        f"pipeline generation: {result['model']}, {result['nodes']} stages, "
        f"{result['tokens']} tokens" + ("" if not bad else " (red: incomplete or different)")
    )
    ax.set_xlabel("frames dropped (%)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend()
