"""Event counts over a sliding time window in bounded memory, and the nearest-rank percentile."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["RATE_BUCKETS", "RateCounter", "nearest_rank"]

RATE_BUCKETS = 20
"""Buckets per window; ratios are windowed to within one bucket's width."""


def nearest_rank(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank `p`-th percentile (0-100) of already sorted, non-empty values."""
    n = len(ordered)
    rank = max(1, math.ceil(p / 100.0 * n))
    return ordered[min(rank, n) - 1]


class RateCounter:
    """Event counts over a sliding window, bucketed so memory stays bounded."""

    __slots__ = ("_buckets", "_newest", "_width")

    def __init__(self, window: float) -> None:
        self._width = window / RATE_BUCKETS
        self._buckets: dict[int, int] = {}
        self._newest: int | None = None

    def _index(self, now: float) -> int:
        return math.floor(now / self._width)

    def add(self, now: float, n: int) -> None:
        if n == 0 or not math.isfinite(now):
            return  # a non-finite time has no bucket; the caller's totals still count it
        idx = self._index(now)
        if self._newest is None or idx > self._newest:
            self._newest = idx
            horizon = idx - RATE_BUCKETS
            for stale in [k for k in self._buckets if k <= horizon]:
                del self._buckets[stale]
        elif idx <= self._newest - RATE_BUCKETS:
            return  # already outside every window that ends at or after _newest
        self._buckets[idx] = self._buckets.get(idx, 0) + n

    def count(self, now: float) -> int:
        if not math.isfinite(now):
            return 0
        # An event counts while its bucket is among the RATE_BUCKETS ending at now's,
        # i.e. for between (1 - 1/RATE_BUCKETS) and 1 times rate_window.
        hi = self._index(now)
        lo = hi - RATE_BUCKETS
        return sum(c for k, c in self._buckets.items() if lo < k <= hi)
