"""Repeated, interleaved measurements, summarised as a median and a spread.

On a shared or noisy machine one run of a configuration says little: the load of the other
processes drifts over minutes. The benchmarks therefore run every configuration once per round,
in the same order, for several rounds (`--repeats`), so that a drift in load falls on every
configuration alike, and report per figure the median over the rounds and its spread (the
smallest and the largest value). In the JSON a figure `key` keeps its name and holds the
median; `key_spread` holds `[min, max]`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_REPEATS",
    "SPREAD_SUFFIX",
    "median_and_spread",
    "run_interleaved",
    "summarize",
    "with_spread",
]

DEFAULT_REPEATS = 3
SPREAD_SUFFIX = "_spread"

Config = TypeVar("Config")
Sample = TypeVar("Sample")


def run_interleaved(
    configs: Sequence[Config],
    repeats: int,
    measure: Callable[[Config, int], Sample],
    progress: Callable[[str], None] | None = None,
    label: Callable[[Config], str] = str,
) -> list[list[Sample]]:
    """`measure(config, round)` for every config in every round, the configs interleaved.

    Returns one list of samples per config (in the order of `configs`), one sample per round.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    samples: list[list[Sample]] = [[] for _ in configs]
    for round_index in range(repeats):
        for index, config in enumerate(configs):
            if progress is not None:
                progress(f"{label(config)} (round {round_index + 1} of {repeats})")
            samples[index].append(measure(config, round_index))
    return samples


def median_and_spread(
    values: Iterable[float | int | None], digits: int = 2
) -> tuple[float | None, list[float] | None]:
    """The median and `[min, max]` of the values that are not None (None, None if none)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    median = statistics.median(present)
    if all(isinstance(v, int) for v in present) and median == int(median):
        return int(median), [min(present), max(present)]
    return round(median, digits), [round(min(present), digits), round(max(present), digits)]


def summarize(
    samples: Sequence[dict[str, Any]], keys: Iterable[str], digits: int = 2
) -> dict[str, Any]:
    """The first sample, with each figure in `keys` replaced by its median over the samples
    and given a `key_spread`. Other fields are the first sample's: the caller merges those
    that differ between rounds (errors, verdicts)."""
    if not samples:
        raise ValueError("nothing to summarize")
    merged = dict(samples[0])
    for key in keys:
        median, spread = median_and_spread((s.get(key) for s in samples), digits)
        merged[key] = median
        merged[key + SPREAD_SUFFIX] = spread
    return merged


def with_spread(row: dict[str, Any], key: str, fmt: str = "{:g}", sep: str = " ") -> str:
    """'median (min–max)' for a table cell (`sep` between them: a newline keeps wide tables
    narrow); just the median when the spread is one value."""
    value = row.get(key)
    if value is None:
        return ""
    spread = row.get(key + SPREAD_SUFFIX)
    text = fmt.format(value)
    if not spread or spread[0] == spread[1]:
        return text
    return f"{text}{sep}({fmt.format(spread[0])}–{fmt.format(spread[1])})"
