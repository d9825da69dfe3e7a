"""When and how a receiver tells its publisher what it has (ACK) and what it misses (NACK).

Acks are delayed a little (`ack_delay`, or every `ack_every` envelopes) unless something needs
the publisher's attention at once; NACKs wait `nack_delay` (reordered messages arrive first)
and back off exponentially while the same holes stay open. The receiver decides what to say;
this decides when, and sends it.
"""

from __future__ import annotations

from typing import Protocol

from .config import ProtocolConfig
from .control import AckInfo, encode_ack, encode_ranges
from .envelope import Envelope, EnvelopeCodec, Flags, Kind
from .health import PeerHealth
from .rangeset import RangeSet
from .stats import EndpointStats


class FeedbackHost(Protocol):
    """What feedback needs from the endpoint."""

    node_id: str
    config: ProtocolConfig
    stats: EndpointStats
    envelopes: EnvelopeCodec

    def transmit(self, peer: str | None, topic: str | None, data: bytes) -> None: ...
    def health(self, peer: str) -> PeerHealth: ...


class Feedback:
    """Ack and NACK timers of one receiver, and the envelopes that carry them."""

    def __init__(
        self, host: FeedbackHost, *, origin: str, stream: str, epoch: int, direct: bool
    ) -> None:
        self.host = host
        self.origin = origin
        self.stream = stream
        self.epoch = epoch
        self.direct = direct
        self.ack_at: float | None = None
        self.nack_at: float | None = None
        self.advertised = 0  # the flow-control limit our last ack carried
        self._ack_pending = 0
        # The largest sequence number that arrived and when (QUIC's ack delay is that of the
        # largest acknowledged: the publisher samples the RTT from it).
        self._largest = -1
        self._largest_at: float | None = None
        self._largest_again = False
        self._last_arrival: float | None = None
        self._nacked = RangeSet()
        self._nack_round = 0

    def next_timer(self) -> float | None:
        """The earlier of the ack and NACK deadlines."""
        times = [t for t in (self.ack_at, self.nack_at) if t is not None]
        return min(times) if times else None

    def note_arrival(self, seq: int, arrived: float, now: float, again: bool = False) -> bool:
        """`seq` arrived (first time) at `arrived`: the transport's time, if it kept one;
        `again`: that copy was flagged as sent again.

        Returns whether the stream was quiet before (nothing for `ack_delay`): a lone message
        (a token) is acked at once, which costs no more acks than delaying it and gives its
        publisher an RTT sample free of ack delay, so its probe timer stays tight.
        """
        if seq > self._largest:
            self._largest = seq
            self._largest_at = arrived
            self._largest_again = again
        quiet = self._last_arrival is None or now - self._last_arrival >= self.host.config.ack_delay
        self._last_arrival = now
        return quiet

    def schedule_ack(self, now: float, *, immediate: bool) -> None:
        """Something arrived that the publisher should hear of (at once if `immediate`)."""
        self._ack_pending += 1
        if immediate or self._ack_pending >= self.host.config.ack_every:
            self.ack_at = now
        elif self.ack_at is None:
            self.ack_at = now + self.host.config.ack_delay

    def send_ack(self, now: float, floor: int, held: RangeSet, limit: int) -> None:
        """Send an ACK: everything below `floor` settled, `held` above it, credit to `limit`."""
        # From the arrival of the largest sequence number to now: the ack timer, and the
        # time the frame waited before it was processed when the transport stamped it.
        arrived = self._largest_at if self._largest_at is not None else now
        info = AckInfo(
            floor=floor,
            ranges=held,
            ack_delay=max(0.0, now - arrived),
            limit=limit,
            original=None if self._largest < 0 else not self._largest_again,
        )
        self.advertised = limit
        self._control(Kind.ACK, encode_ack(info))
        self.host.stats.acks_sent += 1
        self._ack_pending = 0
        self.ack_at = None

    def arm_nack(self, now: float, missing: bool) -> None:
        """Holes exist (`missing`) or not: start or stop the NACK timer."""
        if not missing:
            self.nack_at = None
            self._nack_round = 0
        elif self.nack_at is None:
            self.nack_at = now + self.host.config.nack_delay

    def send_nack(self, now: float, missing: RangeSet, delivered_to: int) -> None:
        """NACK `missing` (nothing below `delivered_to` is asked for again), then back off."""
        if not missing:
            self.nack_at = None
            return
        fresh = RangeSet(missing)
        for r in self._nacked:
            fresh.subtract(r.start, r.stop)
        for r in missing:
            self._nacked.add(r.start, r.stop)
        self._nacked.subtract(0, delivered_to)
        health = self.host.health(self.origin)
        if fresh:
            health.on_loss_detected(now, fresh.count())
        health.on_nack_sent(now, missing.count())
        self._control(Kind.NACK, encode_ranges(missing))
        self.host.stats.nacks_sent += 1
        self._nack_round += 1
        cfg = self.host.config
        backoff = min(cfg.nack_backoff_cap, cfg.nack_delay * 2.0**self._nack_round)
        self.nack_at = now + backoff

    def _control(self, kind: Kind, payload: bytes) -> None:
        env = Envelope(
            kind=kind,
            origin=self.host.node_id,
            stream=self.stream,
            epoch=self.epoch,
            seq=0,
            payload=payload,
            flags=Flags.DIRECT if self.direct else Flags.NONE,
        )
        self.host.transmit(self.origin, None, self.host.envelopes.encode(env))
