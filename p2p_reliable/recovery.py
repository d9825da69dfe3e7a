"""Retransmission timing: RTT estimation (RFC 6298, with QUIC's ack-delay and min-RTT rules),
the probe timeout of RACK-TLP, a backoff with jitter, and the give-up budget."""

from __future__ import annotations

import random

import attrs

# The clock granularity QUIC assumes (RFC 9002, kGranularity): no timer is shorter.
GRANULARITY = 0.001


@attrs.frozen
class RetryPolicy:
    """How long to wait before retransmitting, and when to give up.

    A publisher probes a receiver that has not acknowledged its newest data within a probe
    timeout (`RttEstimator.pto`, about two smoothed RTTs), then again after timeouts that
    double up to `cap`; acknowledgements that show later data arrived repair a hole at once
    (RACK, RFC 8985). `base` is the RTT assumed before any was measured (RFC 6298 says 1 s
    for TCP; a cluster on one LAN wants far less). `min_rto` floors the RTO, which answers a
    receiver's NACK only for what was sent at least rto/2 ago.

    Giving up follows time, not a count: a message still unacknowledged `budget` seconds
    after its first transmission is Unrecoverable (so is everything owed to a peer the
    endpoint is told is gone, at once). Unset, the budget is `cap * max_attempts`: the time
    `max_attempts` timeouts at the cap would take (16 s by default). A live peer behind 30%
    loss sees dozens of transmissions of a message within it.
    """

    base: float = 0.3
    min_rto: float = 0.2
    cap: float = 2.0
    max_attempts: int = 8
    budget: float | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 < self.min_rto <= self.cap or self.base <= 0 or self.max_attempts < 1:
            raise ValueError(f"inconsistent retry policy: {self}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"the give-up budget must be positive: {self}")

    def delay(self, rto: float, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after transmission number `attempt` before the next one.

        "Full jitter" from `[rto, min(cap, rto * 2**attempt)]`: never earlier than the RTO
        (clamped to [min_rto, cap]), exponentially later after each timeout, and spread out
        so that many receivers that lost the same message do not hammer it in lockstep.
        """
        floor = min(max(rto, self.min_rto), self.cap)
        ceiling = min(self.cap, floor * 2.0 ** min(attempt, 32))
        return max(floor, rng.uniform(0.0, ceiling))

    def probe_delay(self, pto: float, probes: int, rng: random.Random) -> float:
        """Seconds until the next probe of a receiver that answered none of `probes` probes.

        The first waits `pto`; later ones double it (jittered within the upper half, so that
        receivers cut off together are not probed in lockstep), up to `cap`.
        """
        if probes == 0:
            return min(pto, self.cap)
        ceiling = min(self.cap, pto * 2.0 ** min(probes, 32))
        return rng.uniform(ceiling / 2, ceiling)

    def max_span(self) -> float:
        """The time from a message's first transmission to its Unrecoverable verdict."""
        return self.budget if self.budget is not None else self.cap * self.max_attempts


# How many samples a spurious probe widens the probe timeout for.
SPURIOUS_WIDENING = 64


class RttEstimator:
    """Smoothed RTT and variance as in RFC 6298, section 2, and the minimum RTT.

    Samples are corrected for the delay the receiver reports between the arrival of what it
    acknowledges and its acknowledgement (its ack timer, and the time the frame waited for
    it when its transport stamped the arrival), as in QUIC (RFC 9002, 5.3). Unlike QUIC, the
    correction is not limited by the minimum RTT: here most acknowledgements are delayed,
    so that minimum would include a delay, and the first samples of a busy receiver would
    count its queue for good. A report at least as long as the sample is ignored; an
    overstated one can only make the publisher probe that receiver sooner.
    """

    ALPHA = 1 / 8
    BETA = 1 / 4
    K = 4

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.latest: float | None = None
        self.min_rtt: float | None = None
        self.samples = 0
        self.backoff = 1  # RFC 6298 (5.5): doubled per timeout, reset by the next sample
        # Samples left during which the probe timeout allows for the variance too: set when
        # a probe turned out spurious (the receiver had the original), as RACK widens its
        # reordering window when a retransmission was (RFC 8985, 6.2).
        self.wide_samples = 0

    def on_sample(self, rtt: float, ack_delay: float = 0.0) -> float:
        """Feed one RTT measurement (from a message that was sent once: Karn's rule) and the
        time the receiver held its acknowledgement back; return the corrected sample."""
        rtt = max(rtt, 0.0)
        if 0.0 < ack_delay < rtt:
            rtt = max(rtt - ack_delay, GRANULARITY)
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        self.latest = rtt
        self.backoff = 1
        self.samples += 1
        self.wide_samples = max(0, self.wide_samples - 1)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        return rtt

    def on_timeout(self) -> None:
        """A retransmission timer expired: back off the RTO."""
        self.backoff = min(self.backoff * 2, 64)

    @property
    def rto(self) -> float:
        """The retransmission timeout (backed off), clamped to the policy's [min_rto, cap]."""
        if self.srtt is None:
            value = self.policy.base
        else:
            value = self.srtt + max(self.K * self.rttvar, GRANULARITY)
        return min(max(value * self.backoff, self.policy.min_rto), self.policy.cap)

    def pto(self, max_ack_delay: float) -> float:
        """The probe timeout: how long the newest unacknowledged data may go unanswered.

        RFC 8985's 2 * SRTT, plus the longest the receiver may hold its acknowledgement back
        (not in the samples). Before any sample: `base`. Not QUIC's SRTT + 4 * RTTVAR: on a
        loaded node the variance is scheduling noise, and waiting it out would cost a lost
        token several RTTs where a spurious probe costs one small duplicate. But once a probe
        of this peer proved spurious, for `SPURIOUS_WIDENING` samples: at least QUIC's.
        """
        if self.srtt is None:
            return self.policy.base
        core = max(2 * self.srtt, GRANULARITY)
        if self.wide_samples:
            core = max(core, self.srtt + self.K * self.rttvar)
        return min(core + max_ack_delay, self.policy.cap)

    def on_spurious(self) -> None:
        """A probe was answered by its original: allow for the variance for a while."""
        self.wide_samples = SPURIOUS_WIDENING

    def upper_bound(self) -> float:
        """SRTT + 4 * RTTVAR: RFC 6298's RTO before its clamps, the RTT rarely exceeded."""
        if self.srtt is None:
            return self.policy.base
        return self.srtt + max(self.K * self.rttvar, GRANULARITY)

    def reorder_window(self) -> float:
        """How much earlier than a delivered message another must have been sent to count as
        lost (RACK's reordering window: a quarter of the minimum RTT)."""
        return max((self.min_rtt or 0.0) / 4, GRANULARITY)
