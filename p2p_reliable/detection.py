"""When a publisher sends something again: RACK, tail probes, redundant copies, the budget.

Loss detection is per receiver (a `SendWindow`), not per message:

- RACK (RFC 8985), on direct streams: an acknowledgement that shows a message arrived shows
  that every message sent more than an RTT plus a reordering window before it and still
  unacknowledged was lost; those go again at once, at the speed of the link instead of a
  timer. Only a transmission known to have arrived counts: a first one, or a retransmission
  acknowledged at least a minimum RTT after it left. A direct stream's frames share one
  ordered path; a topic's do not (the router sends small frames through gossipsub, which
  handles each message in a task of its own, and large ones point to point, and measured
  under load 40% of a topic's messages arrive after later ones, some by more than an RTT),
  so on topics the receiver's NACK (which waits for reordering) and the probes repair.
- Tail probes (RACK-TLP's TLP, QUIC's PTO): nothing sent after a lost message can reveal its
  loss when nothing was sent after it, as with one token in flight. When the newest
  unacknowledged data goes unanswered for a probe timeout (about two smoothed RTTs plus the
  receiver's ack delay), its newest fragment goes again; the receiver acknowledges a
  duplicate at once, so either way its answer shows the holes (to RACK; on a topic the
  receiver NACKs them). Unanswered probes back off exponentially up to the policy's cap;
  from the second on, each also resends the oldest unacknowledged fragment, the one
  in-order delivery waits for.
- The budget: a message still unacknowledged `retry.max_span()` after its first
  transmission is given up (and a receiver the endpoint is told is gone, at once).

A receiver that merely stalls (its process busy) costs a probe per probe timeout, not a
retransmission of everything in flight.

Redundancy: a small latency-critical message may be sent twice, the copy `spacing` later so
that one lost frame does not take both; a copy is skipped once every receiver acknowledged.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from .config import ProtocolConfig
from .congestion import DelayWindow
from .control import AckInfo
from .health import PeerHealth
from .recovery import RetryPolicy, RttEstimator
from .stats import EndpointStats
from .windows import InFlight, SendWindow


def delivered_sent_at(
    acked: list[int], flights: list[InFlight], now: float, min_rtt: float
) -> tuple[float, int]:
    """(when it was sent, seq) of the most recently sent of just-acknowledged transmissions,
    counting only those known to be the ones that arrived; (-inf, -1) if none is."""
    latest = (float("-inf"), -1)
    for seq, flight in zip(acked, flights, strict=True):
        if flight.attempt == 0:
            latest = max(latest, (flight.first_sent, seq))
        elif now - flight.last_sent >= min_rtt:
            latest = max(latest, (flight.last_sent, seq))
    return latest


def rack_lost(rcv: SendWindow, reorder_window: float, now: float) -> list[int]:
    """Unacknowledged sequence numbers sent before the newest one known to have arrived and
    longer ago than its RTT plus a reordering window: lost. Sets `rack_at` to when the next
    of those sent before it would be."""
    lost = []
    rcv.rack_at = None
    for seq, flight in rcv.unacked.items():
        sent = flight.last_sent
        if sent > rcv.rack_sent or (sent == rcv.rack_sent and seq > rcv.rack_seq):
            continue
        due = sent + rcv.rack_rtt + reorder_window
        if due <= now:
            lost.append(seq)
        elif rcv.rack_at is None or due < rcv.rack_at:
            rcv.rack_at = due
    return lost


def probe_targets(rcv: SendWindow) -> list[int]:
    """What a probe sends again: the newest unacknowledged fragment, and from the second
    unanswered probe on the oldest too."""
    newest = next(reversed(rcv.unacked))
    oldest = next(iter(rcv.unacked))
    return [newest] if rcv.probes <= 1 or oldest == newest else [oldest, newest]


def arm_probe(
    rcv: SendWindow,
    now: float,
    policy: RetryPolicy,
    rtt: RttEstimator,
    max_ack_delay: float,
    rng: random.Random,
) -> None:
    """(Re)start the probe timer from `now`, or stop it when nothing is unacknowledged."""
    if not rcv.unacked:
        rcv.probe_at = None
        rcv.probes = 0
        return
    rcv.probe_at = now + policy.probe_delay(rtt.pto(max_ack_delay), rcv.probes, rng)


def give_up_at(rcv: SendWindow, budget: float) -> float | None:
    """When its oldest unacknowledged message runs out of budget."""
    if not rcv.unacked:
        return None
    return next(iter(rcv.unacked.values())).first_sent + budget


def out_of_budget(rcv: SendWindow, now: float, budget: float) -> list[int]:
    """Unacknowledged sequence numbers first sent `budget` or more before `now`."""
    out = []
    for seq, flight in rcv.unacked.items():
        if flight.first_sent + budget > now:  # the expression of give_up_at: no livelock
            break
        out.append(seq)
    return out


def next_deadline(rcv: SendWindow, budget: float) -> float | None:
    """The earliest of its probe, RACK and give-up times."""
    if rcv.failed or not rcv.unacked:
        return None
    times = [t for t in (rcv.probe_at, rcv.rack_at, give_up_at(rcv, budget)) if t is not None]
    return min(times) if times else None


class CopySchedule:
    """Redundant copies still to send: (when, seq), in the order they fall due."""

    def __init__(self) -> None:
        self._due: deque[tuple[float, int]] = deque()

    def add(self, when: float, seqs: range) -> None:
        """Send another copy of each of `seqs` at `when` (never earlier than those queued)."""
        when = max(when, self._due[-1][0]) if self._due else when
        self._due.extend((when, seq) for seq in seqs)

    def next_time(self) -> float | None:
        """When the next copy is due."""
        return self._due[0][0] if self._due else None

    def pop_due(self, now: float) -> list[int]:
        """The copies due at `now`."""
        out = []
        while self._due and self._due[0][0] <= now:
            out.append(self._due.popleft()[1])
        return out


class RecoveryHost(Protocol):
    """What loss recovery needs from the endpoint."""

    config: ProtocolConfig
    rng: random.Random
    stats: EndpointStats

    def transmit(self, peer: str | None, topic: str | None, data: bytes) -> None: ...
    def rtt(self, peer: str) -> RttEstimator: ...
    def congestion(self, peer: str) -> DelayWindow: ...
    def health(self, peer: str) -> PeerHealth: ...


class LossRecovery:
    """The retransmissions of one stream: RACK, probes and redundant copies, as above.

    `data(seq)` is the encoded envelope of an unacknowledged sequence number; `topic` is the
    stream's topic (None for a direct stream), where first transmissions and copies go.
    """

    def __init__(
        self, host: RecoveryHost, *, topic: str | None, data: Callable[[int], bytes]
    ) -> None:
        self.host = host
        self.topic = topic
        self._data = data
        self._copies = CopySchedule()

    def on_sent(self, rcv: SendWindow, now: float) -> None:
        """New data went to `rcv`: the probe timer runs from the newest transmission (the
        backed-off probes of an unresponsive receiver keep their schedule)."""
        if rcv.probes == 0:
            self._arm(rcv, now)

    def send_twice(self, seqs: range, now: float) -> None:
        """Send `seqs` again `redundant_spacing` from now, unless acknowledged by then."""
        self._copies.add(now + self.host.config.redundant_spacing, seqs)

    def on_acked(
        self, rcv: SendWindow, info: AckInfo, acked: list[int], flights: list[InFlight], now: float
    ) -> None:
        """`info` from `rcv` newly acknowledged `acked` (ascending), in flight as `flights`."""
        host = self.host
        rtt = host.rtt(rcv.peer)
        # The ack delay the receiver reports is that of the largest sequence number it has:
        # a sample only from that one, and only if it was sent once (Karn's rule).
        if acked[-1] == rcv.largest_acked and flights[-1].attempt == 0:
            sample = rtt.on_sample(now - flights[-1].first_sent, info.ack_delay)
            host.health(rcv.peer).on_rtt_sample(sample, now)
            host.congestion(rcv.peer).on_sample(sample, now)
        if self.topic is None:
            sent, seq = delivered_sent_at(acked, flights, now, rtt.min_rtt or 0.0)
            if (sent, seq) > (rcv.rack_sent, rcv.rack_seq):
                rcv.rack_sent, rcv.rack_seq, rcv.rack_rtt = sent, seq, now - sent
                self.rack(rcv, now)
        rcv.probes = 0
        self._arm(rcv, now)

    def rack(self, rcv: SendWindow, now: float) -> None:
        """Send again what RACK finds lost by `now`."""
        window = self.host.rtt(rcv.peer).reorder_window()
        for seq in rack_lost(rcv, window, now):
            self.retransmit(rcv, seq, now)
            self.host.stats.rack_retransmits += 1

    def next_timer(self, windows: Iterable[SendWindow]) -> float | None:
        """The earliest probe, give-up or copy time."""
        budget = self.host.config.retry.max_span()
        times = [next_deadline(rcv, budget) for rcv in windows]
        times.append(self._copies.next_time())
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def send_copies(self, windows: Iterable[SendWindow], now: float) -> None:
        """Send the copies due, of what some receiver has not acknowledged yet."""
        due = self._copies.pop_due(now)
        if not due:
            return
        live = [rcv for rcv in windows if not rcv.failed]
        for seq in due:
            waiting = [rcv for rcv in live if seq in rcv.unacked]
            if waiting:
                self.host.transmit(
                    waiting[0].peer if self.topic is None else None, self.topic, self._data(seq)
                )
                self.host.stats.redundant_copies += 1
                for rcv in waiting:
                    rcv.unacked[seq].last_sent = now

    def run_timers(self, rcv: SendWindow, now: float) -> None:
        """Resend what RACK's timer finds lost; probe `rcv` if its probe timer expired."""
        if rcv.rack_at is not None and rcv.rack_at <= now:
            self.rack(rcv, now)
        if not rcv.unacked or rcv.probe_at is None or rcv.probe_at > now:
            return
        rcv.probes += 1
        if rcv.probes > 1:
            self.host.rtt(rcv.peer).on_timeout()  # the last probe went unanswered
        for seq in probe_targets(rcv):
            self.retransmit(rcv, seq, now)
            self.host.stats.probes += 1
        self._arm(rcv, now)

    def retransmit(self, rcv: SendWindow, seq: int, now: float) -> None:
        """Send `seq` to `rcv` again (point to point)."""
        flight = rcv.unacked[seq]
        flight.attempt += 1
        flight.last_sent = now
        self.host.transmit(rcv.peer, None, self._data(seq))
        self.host.health(rcv.peer).on_retransmit(now)
        self.host.stats.retransmits += 1

    def _arm(self, rcv: SendWindow, now: float) -> None:
        cfg = self.host.config
        arm_probe(rcv, now, cfg.retry, self.host.rtt(rcv.peer), cfg.ack_delay, self.host.rng)
