"""The PNG of `p2pr bench loss-sweep`: goodput, and token latency (p50, p99, TTFT), against
the loss rate; matplotlib (the `plot` extra) draws it with the Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pr.bench.losssweep import size_label

__all__ = ["PlotUnavailableError", "require_matplotlib", "write_plot"]


class PlotUnavailableError(RuntimeError):
    """matplotlib, which draws the PNG, is not installed."""


def require_matplotlib() -> None:
    """Raise `PlotUnavailableError` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError(
            "matplotlib is not installed; it comes with the 'plot' extra: "
            "pip install -e '.[plot]' (scripts/setup.sh installs it)"
        ) from None


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
