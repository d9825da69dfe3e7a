"""Per-peer health tracking: phi accrual liveness, RTT, loss and corruption rates.

Sans-IO: nothing here reads a clock or does I/O. Every method that depends on time
takes ``now`` (seconds on any monotonic origin), so results are pure functions of the
recorded events and the ``now`` passed to the query.

Windowed ratios keep bounded memory by forgetting buckets that fell out of the window
ending at the newest recorded event, so they answer as expected for queries whose
``now`` is no earlier than the latest recorded event (the normal case with a monotonic
clock); a query further in the past sees only what was kept.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence

import attrs

__all__ = [
    "PHI_CAP",
    "RATE_BUCKETS",
    "RTT_GOOD",
    "HealthConfig",
    "HealthSnapshot",
    "HealthTable",
    "PeerHealth",
    "PeerState",
    "PhiAccrual",
    "nearest_rank",
]

PHI_CAP = 1e3
"""Largest phi ever reported; keeps phi finite (and JSON-friendly) for huge silences."""

RATE_BUCKETS = 20
"""Buckets per ``rate_window``; ratios are windowed to within one bucket's width."""

RTT_GOOD = 0.05
"""p99 RTT (seconds) at or below which the score takes no RTT penalty."""

_LN10 = math.log(10.0)


class PeerState(enum.Enum):
    """Liveness verdict for a peer."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    UNKNOWN = "unknown"


@attrs.frozen
class HealthConfig:
    """Tuning knobs shared by every peer in a :class:`HealthTable`."""

    phi_suspect: float = 3.0
    phi_dead: float = 8.0
    phi_window: int = 100
    # With 100 ms heartbeats these put DEAD ~0.45 s into a silence: well inside the 1 s a
    # cluster wants, yet a 200 ms scheduling hiccup of a Python node is not a death.
    min_std: float = 0.05
    acceptable_pause: float = 0.1
    first_interval: float = 0.1
    rtt_alpha: float = 0.125
    rtt_window: int = 256
    rate_window: float = 10.0

    def __attrs_post_init__(self) -> None:
        # Fail at construction: a bad config would otherwise surface as a silently wrong
        # verdict much later.
        if not 0.0 < self.phi_suspect <= self.phi_dead:
            raise ValueError("need 0 < phi_suspect <= phi_dead")
        if self.phi_window < 1 or self.rtt_window < 1:
            raise ValueError("windows must hold at least one sample")
        if not (self.min_std > 0.0 and self.first_interval > 0.0 and self.rate_window > 0.0):
            raise ValueError("min_std, first_interval and rate_window must be positive")
        if not self.acceptable_pause >= 0.0:
            raise ValueError("acceptable_pause must be >= 0")
        if not 0.0 < self.rtt_alpha <= 1.0:
            raise ValueError("rtt_alpha must be in (0, 1]")


def nearest_rank(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank `p`-th percentile (0-100) of already sorted, non-empty values."""
    n = len(ordered)
    rank = max(1, math.ceil(p / 100.0 * n))
    return ordered[min(rank, n) - 1]


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


class _RateCounter:
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


def _check_n(n: int) -> int:
    if n < 0:
        raise ValueError(f"event count must be >= 0, got {n}")
    return n


@attrs.frozen
class HealthSnapshot:
    """Immutable view of one peer's health at a given ``now``."""

    peer: str
    state: PeerState
    phi: float
    rtt_ewma: float | None
    rtt_p50: float | None
    rtt_p99: float | None
    loss_ratio: float
    retransmit_ratio: float
    sent: int
    retransmits: int
    received: int
    nacks_sent: int
    nacks_received: int
    losses: int
    checksum_failures: int
    decode_errors: int
    unrecoverable: int
    rejections: tuple[tuple[str, int], ...]
    last_seen: float | None
    score: float

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly dict: state by name, rejections as a mapping, floats rounded."""
        out: dict[str, object] = {}
        for field in attrs.fields(HealthSnapshot):
            value = getattr(self, field.name)
            if isinstance(value, float):
                value = round(value, 6)
            out[field.name] = value
        out["state"] = self.state.name
        out["rejections"] = dict(self.rejections)
        return out


class PeerHealth:
    """Everything we know about how well one peer is doing."""

    def __init__(self, peer: str, config: HealthConfig | None = None) -> None:
        self.peer = peer
        self.config = config if config is not None else HealthConfig()
        self._phi = PhiAccrual(self.config)
        # Set by a stream reset and cleared by the next heartbeat; ordering of calls
        # (not timestamps) decides, so a reset and heartbeat at the same instant work.
        self._reset_pending = False
        self._srtt: float | None = None
        self._rtts: deque[float] = deque(maxlen=self.config.rtt_window)
        self._rtts_sorted: list[float] | None = None
        self._last_seen: float | None = None
        w = self.config.rate_window
        self._w_sent = _RateCounter(w)
        self._w_retx = _RateCounter(w)
        self._w_received = _RateCounter(w)
        self._w_lost = _RateCounter(w)
        self._w_faults = _RateCounter(w)
        self._w_unrecoverable = _RateCounter(w)
        self.sent = 0
        self.retransmits = 0
        self.received = 0
        self.nacks_sent = 0
        self.nacks_received = 0
        self.losses = 0
        self.checksum_failures = 0
        self.decode_errors = 0
        self.unrecoverable = 0
        self.rejections: dict[str, int] = {}

    # -- recording -------------------------------------------------------------------

    def _seen(self, now: float) -> None:
        if math.isnan(now):
            return
        if self._last_seen is None or now > self._last_seen:
            self._last_seen = now

    def on_heartbeat(self, now: float) -> None:
        """A heartbeat from this peer arrived."""
        self._phi.heartbeat(now)
        self._reset_pending = False
        self._seen(now)

    def on_rtt_sample(self, rtt: float, now: float) -> None:
        """An RTT measurement; negative or non-finite samples are ignored."""
        if not (math.isfinite(rtt) and rtt >= 0.0):
            return
        # RFC 6298 section 2: the first sample seeds SRTT directly.
        if self._srtt is None:
            self._srtt = rtt
        else:
            a = self.config.rtt_alpha
            self._srtt = (1.0 - a) * self._srtt + a * rtt
        self._rtts.append(rtt)
        self._rtts_sorted = None

    def on_sent(self, now: float, n: int = 1) -> None:
        """Original (first) transmissions to this peer."""
        self.sent += _check_n(n)
        self._w_sent.add(now, n)

    def on_retransmit(self, now: float, n: int = 1) -> None:
        """Retransmissions to this peer."""
        self.retransmits += _check_n(n)
        self._w_retx.add(now, n)

    def on_nack_received(self, now: float, n: int = 1) -> None:
        """NACKs this peer sent us, in sequence numbers."""
        self.nacks_received += _check_n(n)

    def on_nack_sent(self, now: float, n: int = 1) -> None:
        """NACKs we sent this peer, in sequence numbers."""
        self.nacks_sent += _check_n(n)

    def on_received(self, now: float, n: int = 1) -> None:
        """Valid envelopes received from this peer."""
        self.received += _check_n(n)
        self._w_received.add(now, n)
        if n:
            self._seen(now)

    def on_loss_detected(self, now: float, n: int = 1) -> None:
        """Sequence numbers found missing from this peer's streams."""
        self.losses += _check_n(n)
        self._w_lost.add(now, n)

    def on_checksum_failure(self, now: float) -> None:
        """An envelope from this peer failed its checksum."""
        self.checksum_failures += 1
        self._w_faults.add(now, 1)

    def on_decode_error(self, now: float) -> None:
        """Malformed input from this peer."""
        self.decode_errors += 1
        self._w_faults.add(now, 1)

    def on_unrecoverable(self, now: float, n: int = 1) -> None:
        """Messages to or from this peer given up on."""
        self.unrecoverable += _check_n(n)
        self._w_unrecoverable.add(now, n)

    def on_stream_reset(self, now: float) -> None:
        """The transport lost the connection: DEAD until the next heartbeat."""
        self._reset_pending = True

    def on_connected(self, now: float) -> None:
        """A (new) connection to the peer is up: judge its liveness afresh from `now`. The
        silence of a pause or an outage is not a heartbeat interval: it would stretch phi's
        idea of normal for a long time, and a resumed peer busy catching up would be judged
        on evidence from before it stopped."""
        self._phi = PhiAccrual(self.config)
        self._reset_pending = False
        self._seen(now)

    def on_rejected(self, now: float, reason: str) -> None:
        """Input from this peer rejected for ``reason`` (e.g. ``"auth"``)."""
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    # -- queries ---------------------------------------------------------------------

    @property
    def last_seen(self) -> float | None:
        """Latest heartbeat or valid envelope time, or None."""
        return self._last_seen

    def rtt_ewma(self) -> float | None:
        """Smoothed RTT (RFC 6298 SRTT), or None before any sample."""
        return self._srtt

    def rtt_percentile(self, p: float) -> float | None:
        """Nearest-rank ``p``-th percentile (0-100) of the recent RTT samples."""
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
        if not self._rtts:
            return None
        if self._rtts_sorted is None:
            self._rtts_sorted = sorted(self._rtts)
        return nearest_rank(self._rtts_sorted, p)

    def loss_ratio(self, now: float) -> float:
        """lost / (received + lost) over ``rate_window``; 0.0 with no data."""
        lost = self._w_lost.count(now)
        total = self._w_received.count(now) + lost
        return lost / total if total else 0.0

    def retransmit_ratio(self, now: float) -> float:
        """retransmits / sent over ``rate_window``; 0.0 with no data.

        Can exceed 1.0; with no originals in the window the denominator is taken as 1.
        """
        return self._w_retx.count(now) / max(self._w_sent.count(now), 1)

    def phi(self, now: float) -> float:
        """Phi accrual suspicion level for this peer's heartbeats."""
        return self._phi.phi(now)

    def state(self, now: float) -> PeerState:
        """Liveness verdict at ``now``."""
        if self._reset_pending:
            return PeerState.DEAD
        if self._phi.last_arrival is None:
            return PeerState.UNKNOWN
        phi = self._phi.phi(now)
        if phi >= self.config.phi_dead:
            return PeerState.DEAD
        if phi >= self.config.phi_suspect:
            return PeerState.SUSPECT
        return PeerState.ALIVE

    def score(self, now: float) -> float:
        """One number in [0, 1] for ranking peers; higher is better.

        ``score = live * (1 - loss) * (1 - min(retx, 1)) * 0.5**faults
        * 0.75**unrecoverable * rtt``, where ``live`` is 0 when DEAD, 0.5 when UNKNOWN,
        1 below ``phi_suspect`` and falls linearly to 0.5 at ``phi_dead``; ``loss`` and
        ``retx`` are the windowed ratios; ``faults`` counts checksum failures plus decode
        errors and ``unrecoverable`` given-up messages, both within ``rate_window``; and
        ``rtt = clamp(sqrt(RTT_GOOD / p99), 0.5, 1)`` (1 with no samples). Each factor is
        non-increasing in its bad events, so more loss or corruption never raises it.
        """
        state = self.state(now)
        if state is PeerState.DEAD:
            return 0.0
        if state is PeerState.UNKNOWN:
            live = 0.5
        else:
            cfg = self.config
            span = cfg.phi_dead - cfg.phi_suspect
            excess = self._phi.phi(now) - cfg.phi_suspect
            frac = min(max(excess / span, 0.0), 1.0) if span > 0.0 else 0.0
            live = 1.0 - 0.5 * frac
        quality = (1.0 - self.loss_ratio(now)) * (1.0 - min(self.retransmit_ratio(now), 1.0))
        penalty = 0.5 ** self._w_faults.count(now) * 0.75 ** self._w_unrecoverable.count(now)
        p99 = self.rtt_percentile(99.0)
        rtt = 1.0
        if p99 is not None and p99 > RTT_GOOD:
            rtt = max(0.5, math.sqrt(RTT_GOOD / p99))
        return min(max(live * quality * penalty * rtt, 0.0), 1.0)

    def snapshot(self, now: float) -> HealthSnapshot:
        """Freeze the current view at ``now``."""
        return HealthSnapshot(
            peer=self.peer,
            state=self.state(now),
            phi=self.phi(now),
            rtt_ewma=self.rtt_ewma(),
            rtt_p50=self.rtt_percentile(50.0),
            rtt_p99=self.rtt_percentile(99.0),
            loss_ratio=self.loss_ratio(now),
            retransmit_ratio=self.retransmit_ratio(now),
            sent=self.sent,
            retransmits=self.retransmits,
            received=self.received,
            nacks_sent=self.nacks_sent,
            nacks_received=self.nacks_received,
            losses=self.losses,
            checksum_failures=self.checksum_failures,
            decode_errors=self.decode_errors,
            unrecoverable=self.unrecoverable,
            rejections=tuple(sorted(self.rejections.items())),
            last_seen=self._last_seen,
            score=self.score(now),
        )


class HealthTable:
    """Registry of :class:`PeerHealth` records sharing one config."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config if config is not None else HealthConfig()
        self._peers: dict[str, PeerHealth] = {}

    def get(self, peer: str) -> PeerHealth:
        """The record for ``peer``, created on first use."""
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = PeerHealth(peer, self.config)
        return rec

    def peers(self) -> list[str]:
        """Known peer ids, sorted."""
        return sorted(self._peers)

    def remove(self, peer: str) -> None:
        """Forget ``peer``; a no-op if unknown."""
        self._peers.pop(peer, None)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def states(self, now: float) -> dict[str, PeerState]:
        """Every peer's liveness verdict at ``now``: cheaper than snapshots, for polling."""
        return {peer: rec.state(now) for peer, rec in self._peers.items()}

    def snapshots(self, now: float) -> list[HealthSnapshot]:
        """A snapshot of every peer at ``now``, sorted by peer id."""
        return [self._peers[p].snapshot(now) for p in sorted(self._peers)]
