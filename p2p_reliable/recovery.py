"""Retransmission timing: RFC 6298's RTT estimator and an exponential backoff with jitter."""

from __future__ import annotations

import random

import attrs


@attrs.frozen
class RetryPolicy:
    """How long to wait before each retransmission, and when to give up.

    The wait for attempt `n` (0 = the first transmission) is drawn with "full jitter" from
    `[rto, min(cap, rto * 2**n)]`: never earlier than the measured RTO (which would only cause
    spurious retransmissions), exponentially later after each timeout, and spread out so that
    many receivers that lost the same message do not hammer the publisher in lockstep.
    `base` is the RTO used before any RTT has been measured (RFC 6298 says 1 s for TCP; a
    cluster on one LAN wants far less).
    """

    base: float = 0.3
    min_rto: float = 0.2
    cap: float = 2.0
    max_attempts: int = 8

    def __attrs_post_init__(self) -> None:
        if not 0 < self.min_rto <= self.cap or self.base <= 0 or self.max_attempts < 1:
            raise ValueError(f"inconsistent retry policy: {self}")

    def delay(self, rto: float, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after transmission number `attempt` before the next one."""
        floor = min(max(rto, self.min_rto), self.cap)
        ceiling = min(self.cap, floor * 2.0 ** min(attempt, 32))
        return max(floor, rng.uniform(0.0, ceiling))

    def max_span(self) -> float:
        """Upper bound on the time from first transmission to the Unrecoverable verdict."""
        return self.cap * self.max_attempts


class RttEstimator:
    """Smoothed RTT and variance as in RFC 6298, section 2."""

    ALPHA = 1 / 8
    BETA = 1 / 4
    K = 4

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.latest: float | None = None
        self.samples = 0
        self.backoff = 1  # RFC 6298 (5.5): doubled per timeout, reset by the next sample

    def on_sample(self, rtt: float) -> None:
        """Feed one RTT measurement (from a message that was sent once: Karn's rule)."""
        rtt = max(rtt, 0.0)
        self.latest = rtt
        self.backoff = 1
        self.samples += 1
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt

    def on_timeout(self) -> None:
        """A retransmission timer expired: back off every later timer to this peer."""
        self.backoff = min(self.backoff * 2, 64)

    @property
    def rto(self) -> float:
        """The retransmission timeout (backed off), clamped to the policy's [min_rto, cap]."""
        if self.srtt is None:
            value = self.policy.base
        else:
            value = self.srtt + max(self.K * self.rttvar, 0.001)
        return min(max(value * self.backoff, self.policy.min_rto), self.policy.cap)
