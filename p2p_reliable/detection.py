"""When a publisher sends something again: RACK, tail probes, redundant copies, the budget.

Loss detection is per receiver (a `SendWindow`), not per message:

- RACK (RFC 8985): an acknowledgement that shows a message arrived shows that every message
  sent before it, still unacknowledged and older than its RTT plus a reordering window, was
  lost; those go again then, at the speed of the link instead of a timer. Only a
  transmission known to have arrived counts: a first one, or (on a direct stream, whose
  frames share one ordered path) a retransmission acknowledged at least a minimum RTT after
  it left. The window is a quarter of the minimum RTT, or twice the lateness seen of
  messages that arrived after later ones. A topic's frames take two paths (the router sends
  small ones through gossipsub, which handles each message in a task of its own, large ones
  and every retransmission point to point; measured under load, 40% of a topic's messages
  arrive after later ones): there the window is at least SRTT + 4 * RTTVAR plus the ack
  delay, and a retransmission never counts.
- Tail probes (RACK-TLP's TLP, QUIC's PTO): nothing sent after a lost message can reveal its
  loss when nothing was sent after it, as with one token in flight. When the newest
  unacknowledged data goes unanswered for a probe timeout (two smoothed RTTs, plus the
  receiver's ack delay unless it is one fragment sent after a quiet spell, which the
  receiver acks at once), its newest fragment goes again; the receiver acknowledges a
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
from .envelope import EnvelopeCodec
from .health import PeerHealth
from .recovery import RetryPolicy, RttEstimator
from .stats import EndpointStats
from .windows import InFlight, SendWindow

# RACK allows twice the largest lateness it saw (RFC 8985 widens its window when it finds a
# retransmission was spurious; without DSACK here, from what arrived late unretransmitted),
# forgotten by 1/64 per acknowledgement, so that one outlier does not blunt it for long.
REORDER_MARGIN = 2.0
REORDER_DECAY = 1 / 1024


def delivered_sent_at(
    acked: list[int], flights: list[InFlight], now: float, min_rtt: float, same_path: bool
) -> tuple[float, int]:
    """(when it was sent, seq) of the most recently sent of just-acknowledged transmissions,
    counting only those known to be the ones that arrived; (-inf, -1) if none is."""
    latest = (float("-inf"), -1)
    for seq, flight in zip(acked, flights, strict=True):
        if flight.attempt == 0:
            latest = max(latest, (flight.first_sent, seq))
        elif same_path and now - flight.last_sent >= min_rtt:
            latest = max(latest, (flight.last_sent, seq))
    return latest


def learn_reordering(
    rcv: SendWindow, acked: list[int], flights: list[InFlight], now: float, min_rtt: float
) -> None:
    """How much later than expected messages that were not lost arrive: a first transmission
    acknowledged after one sent later, later than that one's RTT by its lateness. It counts
    too when it was sent again in between, but acknowledged sooner than the retransmission
    could have been (a minimum RTT): that retransmission was spurious (RFC 8985 learns this
    from DSACK). Remembered as a decaying maximum."""
    rcv.reorder *= 1 - REORDER_DECAY
    for seq, flight in zip(acked, flights, strict=True):
        original = flight.attempt == 0 or now - flight.last_sent < min_rtt
        if original and (flight.first_sent, seq) < (rcv.rack_sent, rcv.rack_seq):
            rcv.reorder = max(rcv.reorder, now - flight.first_sent - rcv.rack_rtt)


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
    envelopes: EnvelopeCodec

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
        # The receiver acks at once what arrives after a quiet spell (feedback.py).
        rcv.sent_quietly = now - rcv.last_new_send >= self.host.config.ack_delay
        rcv.last_new_send = now
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
        # a sample only from that one, and only if the receiver got its original first (it
        # says so; from one that does not, only if it was sent once: Karn's rule). Samples of
        # the originals of spurious retransmissions are kept: without them only the faster
        # answers of a busy receiver would be sampled, and its probe timer would stay short.
        # But not after more than one copy: a receiver that let several probes go unanswered
        # was away (stopped, swapping), and that pause is not a round trip to plan for.
        last = flights[-1]
        original = info.original if info.original is not None else last.attempt == 0
        if acked[-1] == rcv.largest_acked and original:
            if last.attempt:
                host.stats.spurious_retransmits += last.attempt
                rtt.on_spurious()
            if last.attempt <= 1:
                sample = rtt.on_sample(now - last.first_sent, info.ack_delay)
                host.health(rcv.peer).on_rtt_sample(sample, now)
                host.congestion(rcv.peer).on_sample(sample, now, last.pipe)
        learn_reordering(rcv, acked, flights, now, rtt.min_rtt or 0.0)
        sent, seq = delivered_sent_at(acked, flights, now, rtt.min_rtt or 0.0, self.topic is None)
        if (sent, seq) > (rcv.rack_sent, rcv.rack_seq):
            rcv.rack_sent, rcv.rack_seq, rcv.rack_rtt = sent, seq, now - sent
            self.rack(rcv, now)
        rcv.probes = 0
        self._arm(rcv, now)

    def rack(self, rcv: SendWindow, now: float) -> None:
        """Send again what RACK finds lost by `now`."""
        rtt = self.host.rtt(rcv.peer)
        window = max(rtt.reorder_window(), REORDER_MARGIN * rcv.reorder)
        if self.topic is not None:
            window = max(window, rtt.upper_bound() + self.host.config.ack_delay)
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
                    waiting[0].peer if self.topic is None else None, self.topic, self.again(seq)
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

    def again(self, seq: int) -> bytes:
        """The encoded envelope of `seq`, flagged as sent again."""
        return self.host.envelopes.mark_again(self._data(seq))

    def retransmit(self, rcv: SendWindow, seq: int, now: float) -> None:
        """Send `seq` to `rcv` again (point to point)."""
        flight = rcv.unacked[seq]
        flight.attempt += 1
        flight.last_sent = now
        self.host.transmit(rcv.peer, None, self.again(seq))
        self.host.health(rcv.peer).on_retransmit(now)
        self.host.stats.retransmits += 1

    def _arm(self, rcv: SendWindow, now: float) -> None:
        cfg = self.host.config
        # A lone message sent after a quiet spell is acked at once: no ack delay to allow.
        lone = rcv.sent_quietly and len(rcv.unacked) == 1
        delay = 0.0 if lone else cfg.ack_delay
        arm_probe(rcv, now, cfg.retry, self.host.rtt(rcv.peer), delay, self.host.rng)
