"""The publishing side of one stream: sequence numbers, windows, retransmission, verdicts."""

from __future__ import annotations

import random
from typing import Protocol

from .budget import SendLedger, message_cost
from .config import ProtocolConfig
from .congestion import DelayWindow
from .control import AckInfo, StreamMark, SyncInfo, encode_ranges, encode_sync
from .detection import LossRecovery, out_of_budget
from .envelope import Envelope, EnvelopeCodec, Flags, Kind
from .events import Event, PeerUnreachable, Unrecoverable, WindowOpen
from .fragment import MessageCodec
from .health import PeerHealth
from .rangeset import RangeSet
from .recovery import RttEstimator
from .retention import (
    NO_RETENTION,
    Fragment,
    MessageLog,
    RetentionBudget,
    RetentionLimits,
)
from .stats import EndpointStats
from .windows import InFlight, SendWindow, WindowFull

__all__ = ["SenderHost", "StreamSender", "WindowFull"]


class SenderHost(Protocol):
    """What a StreamSender needs from its endpoint."""

    config: ProtocolConfig
    codec: MessageCodec
    rng: random.Random
    stats: EndpointStats
    envelopes: EnvelopeCodec
    retention: RetentionBudget
    ledger: SendLedger

    def emit(self, event: Event) -> None: ...
    def transmit(self, peer: str | None, topic: str | None, data: bytes) -> None: ...
    def rtt(self, peer: str) -> RttEstimator: ...
    def congestion(self, peer: str) -> DelayWindow: ...
    def health(self, peer: str) -> PeerHealth: ...


class StreamSender:
    """One publisher stream: a topic (to every subscriber) or a direct stream (to one peer).

    Every fragment gets the next sequence number. Each receiver has its own window, retry
    timers and ack state. A direct message leaves the log once its receiver has it; a topic
    message stays `retain_seconds` longer (within the retention bounds) so that a subscriber
    learned of late starts at the oldest retained message: learned of within that time, it
    loses nothing published after it subscribed. Lost messages are found and sent again as
    detection.py describes. A topic receiver that leaves a message unacknowledged past the
    retry budget is marked failed so that one dead subscriber cannot stall the stream; any
    sign of life revives it.
    """

    def __init__(
        self, host: SenderHost, *, name: str, origin: str, epoch: int, dest: str | None
    ) -> None:
        self.host = host
        self.name = name
        self.origin = origin
        self.epoch = epoch
        self.dest = dest
        self.flags = Flags.DIRECT if dest is not None else Flags.NONE
        cfg = host.config
        if dest is None:
            limits = RetentionLimits(cfg.retain_seconds, cfg.retain_messages, cfg.retain_bytes)
            self.log = MessageLog(limits, host.retention)
        else:
            self.log = MessageLog(NO_RETENTION)
        self._receivers: dict[str, SendWindow] = {}
        self.recovery = LossRecovery(
            host, topic=None if dest else name, data=lambda seq: self._fragment(seq).data
        )
        self._blocked: int | None = None  # the size of the message refused, until it fits
        if dest is not None:
            self._receivers[dest] = self._new_receiver(dest, 0)

    @property
    def next_seq(self) -> int:
        """The sequence number the next message gets."""
        return self.log.next_seq

    # -- receivers -------------------------------------------------------------------------

    def receivers(self) -> list[str]:
        """Peers this stream currently waits for."""
        return [p for p, r in self._receivers.items() if not r.failed]

    def serves(self, peer: str) -> bool:
        """Whether this stream currently waits for `peer`."""
        rcv = self._receivers.get(peer)
        return rcv is not None and not rcv.failed

    def add_receiver(self, peer: str, now: float) -> None:
        """Track `peer` from the oldest retained message on (and tell it so with SYNC)."""
        rcv = self._receivers.get(peer)
        if rcv is not None:
            rcv.failed = False
            return
        self._join(peer, now)

    def _join(self, peer: str, now: float) -> SendWindow:
        floor = self.log.floor
        rcv = self._new_receiver(peer, floor)
        if floor < self.next_seq:
            # It repairs [floor, next_seq) by NACK; it gives up what is not repaired within
            # gap_timeout, so keeping these longer than that would serve nobody.
            rcv.pin_stop = self.next_seq
            rcv.pin_until = now + self.host.config.effective_gap_timeout
        self._receivers[peer] = rcv
        self._send_sync(peer, now)
        return rcv

    def _send_sync(self, peer: str, now: float) -> None:
        info = SyncInfo(next_seq=self.next_seq, marks=tuple(self.log.history.marks(now)))
        self._control(peer, Kind.SYNC, seq=self.log.floor, payload=encode_sync(info))

    def remove_receiver(self, peer: str, now: float, reason: str) -> None:
        """Stop tracking `peer`; every message it had not acked becomes Unrecoverable.

        A direct stream's peer is told so (a GAP): those messages are gone. A topic
        subscriber is not: they stay retained, and if it is still there or comes back it
        repairs them like any late joiner, instead of skipping them.
        """
        rcv = self._receivers.get(peer)
        if rcv is None:
            return
        self._abandon(rcv, list(rcv.unacked), now, reason, tell=self.dest is not None)
        # Whatever it held may be gone with it (a restart): assume so rather than wait on it.
        rcv.release_all(self.host.ledger)
        if self.dest is None:
            del self._receivers[peer]
        self._retire(now)

    # -- sending ---------------------------------------------------------------------------

    def blocking_receivers(self, size: int) -> list[str]:
        """Receivers whose window has no room for a message of `size` bytes."""
        cfg = self.host.config
        cost = message_cost(size, cfg.max_fragment_payload)
        return [
            rcv.peer
            for rcv in self._receivers.values()
            if not rcv.failed
            and rcv.full(
                self.next_seq, size, cost, cfg, self.host.ledger, self.host.congestion(rcv.peer)
            )
        ]

    def send(self, payload: bytes, now: float, *, redundant: bool = False) -> int:
        """Queue a message for transmission; return its first sequence number.

        `redundant`: send it a second time `redundant_spacing` later unless acknowledged by
        then (messages over `redundant_max_bytes` never are).
        """
        blocking = self.blocking_receivers(len(payload))
        if blocking:
            self._blocked = len(payload)
            raise WindowFull(self.name, blocking)
        split = self.host.codec.split(payload)
        start = self.next_seq
        count = len(split.pieces)
        kind = Kind.DATA if count == 1 else Kind.FRAGMENT
        fragments = []
        for index, piece in enumerate(split.pieces):
            seq = start + index
            data = self.host.envelopes.encode(
                Envelope(
                    kind=kind,
                    origin=self.origin,
                    stream=self.name,
                    epoch=self.epoch,
                    seq=seq,
                    payload=piece,
                    frag_index=index,
                    frag_count=count,
                    flags=self.flags | split.flags,
                )
            )
            fragments.append(Fragment(msg_start=start, data=data, size=len(piece)))
            self.host.transmit(self.dest, None if self.dest else self.name, data)
        active = [rcv for rcv in self._receivers.values() if not rcv.failed]
        self.log.append(fragments, published=now, owed=len(active))
        total = sum(f.size for f in fragments)
        cost = message_cost(len(payload), self.host.config.max_fragment_payload)
        ledger = self.host.ledger
        for rcv in active:
            rcv.hold(start, start + count, cost, ledger)
            ledger.unacked += count
            self.host.health(rcv.peer).on_sent(now, count)
            congestion = self.host.congestion(rcv.peer)
            congestion.on_sent(total)
            for seq in range(start, start + count):
                rcv.unacked[seq] = InFlight(0, now, now, congestion.in_flight)
            rcv.pending_per_msg[start] = count
            rcv.unacked_bytes += total
            self.recovery.on_sent(rcv, now)
        if redundant and active and len(payload) <= self.host.config.redundant_max_bytes:
            self.recovery.send_twice(range(start, start + count), now)
        self._retire(now)
        return start

    # -- feedback from receivers -----------------------------------------------------------

    def on_ack(self, peer: str, info: AckInfo, now: float) -> None:
        """Process a cumulative+selective acknowledgement from `peer`."""
        rcv = self._sign_of_life(peer, now)
        if rcv is None:
            return
        rcv.limit = max(rcv.limit, info.limit)
        rcv.release_consumed(self.host.config.receive_window, self.host.ledger)
        rcv.acked_floor = max(rcv.acked_floor, info.floor)
        largest = max(info.floor - 1, info.ranges[-1].stop - 1 if info.ranges else -1)
        rcv.largest_acked = max(rcv.largest_acked, largest)
        if rcv.acked_floor >= rcv.pin_stop:
            rcv.pin_stop = 0
        congestion = self.host.congestion(peer)
        in_flight = congestion.in_flight
        acked = [s for s in rcv.unacked if s < info.floor or s in info.ranges]
        flights = [self._settle(rcv, seq) for seq in acked]
        if flights:
            self.recovery.on_acked(rcv, info, acked, flights, now)
            congestion.on_acked(in_flight - congestion.in_flight, in_flight, now)
        self._retire(now)

    def on_nack(self, peer: str, ranges: RangeSet, now: float) -> None:
        """Repair what `peer` reports missing, or tell it what cannot be repaired."""
        rcv = self._sign_of_life(peer, now)
        if rcv is None:
            return
        cfg = self.host.config
        lost = RangeSet()
        need_sync = False
        budget = cfg.reorder_max_ahead  # one NACK cannot make us send more than a window
        for r in ranges:
            for seq in range(r.start, min(r.stop, self.next_seq)):
                budget -= 1
                if budget < 0:
                    break
                frag = self.log.fragment(seq)
                if seq in rcv.abandoned:
                    lost.add(seq)
                elif seq < rcv.start or (frag is None and self.dest is None):
                    # Fell out of retention: the SYNC's marks let the receiver tell whether
                    # it was published before its subscription or is lost to it.
                    need_sync = True
                elif frag is None:
                    lost.add(seq)
                elif seq in rcv.unacked:
                    # Only a hole below something it acknowledged shows a loss: a tail it
                    # learned of from our heartbeat may still wait in our transport's queue
                    # (the probes see to a lost tail). And a NACK right after a
                    # (re)transmission is probably about the same loss.
                    if seq < rcv.largest_acked and (
                        now - rcv.unacked[seq].last_sent >= self.host.rtt(peer).rto / 2
                    ):
                        self.recovery.retransmit(rcv, seq, now)
                        self.host.stats.nack_retransmits += 1
                else:
                    self.host.transmit(peer, None, self.recovery.again(seq))
                    self.host.health(peer).on_retransmit(now)
                    self.host.stats.retransmits += 1
                    self.host.stats.nack_retransmits += 1
        self.host.health(peer).on_nack_received(now, ranges.count())
        if need_sync:
            self._send_sync(peer, now)
        if lost:
            self._control(peer, Kind.GAP, payload=encode_ranges(lost))

    def _sign_of_life(self, peer: str, now: float) -> SendWindow | None:
        rcv = self._receivers.get(peer)
        if rcv is None:
            if self.dest is not None:
                return None  # only the destination can ack a direct stream
            # A subscriber we had not heard of: serve it from the oldest message we keep.
            rcv = self._join(peer, now)
        rcv.failed = False
        return rcv

    # -- timers ----------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When handle_timer next has work to do."""
        return self.recovery.next_timer(self._receivers.values())

    def handle_timer(self, now: float) -> None:
        """Send due copies and probes; give a verdict on what ran out of budget."""
        self.recovery.send_copies(self._receivers.values(), now)
        budget = self.host.config.retry.max_span()
        for rcv in list(self._receivers.values()):
            if rcv.failed or not rcv.unacked:
                continue
            expired = out_of_budget(rcv, now, budget)
            if expired and self.dest is not None:
                msgs = {self._fragment(s).msg_start for s in expired}
                seqs = [s for s in rcv.unacked if self._fragment(s).msg_start in msgs]
                self._abandon(rcv, seqs, now, "retry budget exhausted")
            elif expired:
                self._abandon(rcv, list(rcv.unacked), now, "retry budget exhausted")
                rcv.failed = True
                self.host.emit(PeerUnreachable(peer=rcv.peer, stream=self.name))
                continue
            self.recovery.run_timers(rcv, now)
        self._retire(now)

    def expire(self, now: float) -> None:
        """Evict retained messages whose time is up (called periodically by the endpoint)."""
        self._retire(now)

    def mark(self, peer: str) -> StreamMark:
        """This stream's high-water mark and `peer`'s limit as we know it, for heartbeats."""
        rcv = self._receivers.get(peer)
        return StreamMark(
            stream=self.name,
            flags=self.flags,
            epoch=self.epoch,
            next_seq=self.next_seq,
            limit=rcv.limit if rcv is not None else 0,
        )

    # -- internals -------------------------------------------------------------------------

    def _new_receiver(self, peer: str, start: int) -> SendWindow:
        return SendWindow(peer=peer, start=start, limit=start + self.host.config.receive_window)

    def _fragment(self, seq: int) -> Fragment:
        # Only for sequence numbers some receiver waits for: those are never evicted.
        frag = self.log.fragment(seq)
        assert frag is not None, f"unacked seq {seq} of {self.name!r} left the log"
        return frag

    def _settle(self, rcv: SendWindow, seq: int) -> InFlight:
        flight = rcv.unacked.pop(seq)
        self.host.ledger.unacked -= 1
        frag = self._fragment(seq)
        rcv.unacked_bytes -= frag.size
        self.host.congestion(rcv.peer).on_settled(frag.size)
        left = rcv.pending_per_msg[frag.msg_start] - 1
        if left:
            rcv.pending_per_msg[frag.msg_start] = left
        else:
            del rcv.pending_per_msg[frag.msg_start]
            self.log.settle(frag.msg_start)
        return flight

    def _abandon(
        self, rcv: SendWindow, seqs: list[int], now: float, reason: str, *, tell: bool = True
    ) -> None:
        if not seqs:
            return
        messages = sorted({self._fragment(s).msg_start for s in seqs})
        lost = RangeSet()
        for start in messages:
            lost.add(start, start + self.log.message(start).count)
        for seq in seqs:
            self._settle(rcv, seq)
        for start in messages:
            rcv.release(start, self.host.ledger)  # it gives them up (or we forget it)
            self.host.emit(Unrecoverable(stream=self.name, seq=start, peer=rcv.peer, reason=reason))
        for r in lost:
            rcv.abandoned.add(r.start, r.stop)
        self.host.health(rcv.peer).on_unrecoverable(now, len(messages))
        if tell:
            self._control(rcv.peer, Kind.GAP, payload=encode_ranges(lost))

    def _control(self, peer: str, kind: Kind, *, seq: int = 0, payload: bytes = b"") -> None:
        env = Envelope(
            kind=kind,
            origin=self.origin,
            stream=self.name,
            epoch=self.epoch,
            seq=seq,
            payload=payload,
            flags=self.flags,
        )
        self.host.transmit(peer, None, self.host.envelopes.encode(env))

    def _pinned(self, start: int, now: float) -> bool:
        return any(
            rcv.acked_floor <= start < rcv.pin_stop and now < rcv.pin_until and not rcv.failed
            for rcv in self._receivers.values()
        )

    def _retire(self, now: float) -> None:
        self.log.evict_due(now, lambda start: self._pinned(start, now))
        self.check_window()

    def check_window(self) -> bool:
        """Emit WindowOpen if a refused send would now find room; whether still blocked.

        The endpoint calls it when a receiver's byte credit, shared by all streams, grew.
        """
        if self._blocked is not None and not self.blocking_receivers(self._blocked):
            self._blocked = None
            self.host.emit(WindowOpen(stream=self.name, peer=self.dest))
        return self._blocked is not None
