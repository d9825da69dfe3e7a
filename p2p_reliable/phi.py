"""Hayashibara et al.'s phi accrual failure detector (Akka's variant), sans-IO: every query
takes ``now``."""

from __future__ import annotations

import math
from collections import deque

from .health_config import HealthConfig

__all__ = ["PHI_CAP", "PhiAccrual"]

PHI_CAP = 1e3
"""Largest phi ever reported; keeps phi finite (and JSON-friendly) for huge silences."""

_LN10 = math.log(10.0)


def _softplus(z: float) -> float:
    """ln(1 + e^z) without overflow for large |z|."""
    if z > 0.0:
        return z + math.log1p(math.exp(-z))
    return math.log1p(math.exp(z))


class PhiAccrual:
    """Hayashibara et al.'s phi accrual failure detector, following Akka's variant."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self._config = config if config is not None else HealthConfig()
        self._intervals: deque[float] = deque(maxlen=self._config.phi_window)
        self._last: float | None = None
        self._stats: tuple[float, float] | None = None

    @property
    def last_arrival(self) -> float | None:
        """Time of the latest heartbeat, or None before the first."""
        return self._last

    def heartbeat(self, now: float) -> None:
        """Record a heartbeat arriving at ``now``."""
        if self._last is None or math.isnan(self._last):
            self._last = now
            return
        # An out-of-order timestamp carries no interval information; keeping the later
        # arrival means phi is never computed against a time from the past.
        if now >= self._last:
            self._intervals.append(now - self._last)
            self._last = now
            self._stats = None

    def _mean_std(self) -> tuple[float, float]:
        if self._stats is None:
            n = len(self._intervals)
            if n < 2:
                # Akka's first-heartbeat-estimate: one interval says nothing about spread.
                first = self._config.first_interval
                self._stats = (first, first / 4.0)
            else:
                mean = sum(self._intervals) / n
                var = sum((x - mean) * (x - mean) for x in self._intervals) / n
                self._stats = (mean, math.sqrt(var))
        return self._stats

    def interval_mean(self) -> float:
        """Mean inter-arrival time (``first_interval`` until two intervals are known)."""
        return self._mean_std()[0]

    def interval_std(self) -> float:
        """Population std of inter-arrival times, before the ``min_std`` floor."""
        return self._mean_std()[1]

    def phi(self, now: float) -> float:
        """Suspicion level: -log10 P(a heartbeat is still to come | silence so far).

        0.0 before any heartbeat; always in ``[0, PHI_CAP]``, never NaN. A NaN ``now``
        is treated as infinitely late.
        """
        if self._last is None:
            return 0.0
        mean, std = self._mean_std()
        mean += self._config.acceptable_pause
        std = max(std, self._config.min_std)
        y = (now - self._last - mean) / std
        if math.isnan(y):
            return PHI_CAP
        # Akka's logistic approximation of the normal CDF: F(y) = 1 / (1 + e^-z) with
        # z = y(1.5976 + 0.07056 y^2), so 1 - F = 1 / (1 + e^z) and
        # phi = log10(1 + e^z). Evaluating it as a softplus avoids the log10(0) and
        # exp overflow that the textbook form hits in the tails.
        z = y * (1.5976 + 0.07056 * y * y) if abs(y) < 1e100 else math.copysign(math.inf, y)
        phi = _softplus(z) / _LN10
        return min(phi, PHI_CAP)
