"""The receiving side of one (publisher, stream, epoch): reorder, deduplicate, ack, NACK, gap."""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from .budget import ENVELOPE_OVERHEAD, Decompression, ReceiveBudget, StreamAccount
from .config import ProtocolConfig
from .control import SyncInfo
from .envelope import Envelope, EnvelopeCodec, Flags, Kind
from .events import Delivered, Event, Gap
from .feedback import Feedback
from .fragment import MessageCodec, ReassemblyError
from .health import PeerHealth
from .losses import EVICTED, NOT_OWED, NOT_REPAIRED, TIMED_OUT, Losses
from .rangeset import RangeSet
from .stats import EndpointStats

_MAX_KNOWN_MARKS = 64
# Reasons of the Rejected events a receiver causes (the router counts them per peer).
OVER_CREDIT = "over credit"
DECOMPRESSION_OVER_CREDIT = "decompressed size over credit"
_STALLED = object()  # _reassemble: the message waits for byte credit


class ReceiverHost(Protocol):
    """What a StreamReceiver needs from its endpoint."""

    node_id: str
    config: ProtocolConfig
    codec: MessageCodec
    stats: EndpointStats
    envelopes: EnvelopeCodec
    budget: ReceiveBudget

    def emit(self, event: Event) -> None: ...
    def transmit(self, peer: str | None, topic: str | None, data: bytes) -> None: ...
    def health(self, peer: str) -> PeerHealth: ...
    def refuse(self, peer: str, reason: str, now: float) -> None: ...


class StreamReceiver:
    """Delivers one publisher's stream in order, exactly once, or reports a Gap.

    Until the receiver knows where its stream starts (it saw seq 0 or a SYNC) it only
    buffers. Holes are NACKed after `nack_delay` with exponential backoff; a hole the publisher
    declares lost (GAP) or that outlives `gap_timeout` becomes a Gap event and delivery moves on.

    Join semantics: the receiver is owed every message published after `owed_since` (when
    both its subscription and its connection to the publisher existed). A SYNC names the
    oldest message the publisher still holds and marks what fell out of its retention below
    it; of that, whatever may have been published after `owed_since` is reported as a Gap, the
    rest was never owed and is skipped silently. Nothing below `resume` (delivered by an
    earlier receiver of the same stream and epoch) is delivered again; `synced_at` starts a
    receiver that continues a freed one synced there at once.

    Bounds: a direct stream's publisher that sends beyond the credit we advertised is refused
    (`OVER_CREDIT`); every buffered fragment and, with flow control, every delivered message
    not yet consumed is charged to the publisher's byte budget, and what does not fit is
    dropped unacked; a compressed message is decompressed only within the publisher's credit.
    """

    def __init__(
        self,
        host: ReceiverHost,
        *,
        origin: str,
        stream: str,
        epoch: int,
        direct: bool,
        now: float,
        owed_since: float = -math.inf,
        resume: int = 0,
        synced_at: int | None = None,
    ) -> None:
        self.host = host
        self.origin = origin
        self.stream = stream
        self.epoch = epoch
        self.direct = direct
        self.synced = False
        self.next = 0
        self.created = now
        self.high_water = 0
        self.consumed = 0  # flow control: what the application has taken, as a seq
        self.owed_since = owed_since
        self._resume = resume
        self.last_active = now  # kept by the endpoint: when something last arrived
        self._buffer: dict[int, Envelope] = {}
        self._held = RangeSet()
        self.account = StreamAccount(host.budget, origin, self)
        self._lost = Losses()
        self._known: deque[tuple[float, int]] = deque()
        self.feedback = Feedback(host, origin=origin, stream=stream, epoch=epoch, direct=direct)
        if synced_at is not None:
            self._sync(synced_at)

    # -- input -----------------------------------------------------------------------------

    def on_data(self, env: Envelope, now: float, arrived: float | None = None) -> None:
        """A DATA or FRAGMENT envelope of this stream arrived (checksum already verified);
        `arrived`: when the transport took its frame in, if earlier than `now`."""
        cfg = self.host.config
        seq = env.seq
        if (self.synced and seq < self.next) or seq in self._buffer:
            self.host.stats.duplicates += 1
            self._schedule_ack(now, immediate=True)
            return
        # (No valid message has more fragments than max_fragments: a larger index claims a
        # start further back than any message it could belong to.)
        start = seq - min(env.frag_index, self.host.codec.max_fragments() - 1)
        if self.direct and self.synced and start >= self.limit:
            # A direct publisher starts messages only below the limit we gave it (a topic's
            # may not know of us yet): this one ignores our credit.
            self.host.stats.over_credit += 1
            self.host.refuse(self.origin, OVER_CREDIT, now)
            return
        base = self.next if self.synced else min(self._buffer, default=seq)
        if seq >= base + cfg.reorder_max_ahead:
            # Not acked, so the publisher will send it again once we have drained.
            self.host.stats.overflow_drops += 1
            return
        head = start if start == (self.next if self.synced else self._resume) else None
        if not self.account.admit(len(env.payload), head):
            # Flow, not hostility: unacked, it comes again once the application consumed.
            self.host.stats.budget_drops += 1
            return
        self._buffer[seq] = env
        self._held.add(seq)
        quiet = self.feedback.note_arrival(
            seq, now if arrived is None else min(arrived, now), now, bool(env.flags & Flags.AGAIN)
        )
        if not self.synced and seq == 0:
            self._sync(0)
        # Fragment 0 tells how long its message is: a lost tail fragment is a known hole.
        whole = seq - env.frag_index + min(env.frag_count, self.host.codec.max_fragments())
        self._learn(max(seq + 1, whole), now)
        # At once too when it is out of order or fills a hole (RFC 5681 4.2): the publisher
        # learns of a loss, or of how late a reordered message was, without our delay.
        fills = self._held[-1].stop - 1 > seq
        self._schedule_ack(now, immediate=quiet or fills or not self.synced or seq != self.next)
        self._deliver(now)
        self._arm_nack(now)

    def on_sync(self, start: int, sync: SyncInfo | None, now: float) -> None:
        """The publisher holds the stream from `start` on; `sync` marks what it evicted below.

        Without `sync` (a peer that keeps no history) `start` is where our part begins.
        """
        owed = self._owed_from(start, sync, now)
        if not self.synced:
            base = max(owed, self._resume)
            self._sync(base)
            self._lost.add(self._held.missing(base, start), EVICTED)
        elif start > self.next and sync is None:
            self._lost.add(self._held.missing(self.next, start), NOT_REPAIRED)
        elif start > self.next:
            # It cannot repair what lies below `start`: deliver what we hold; of the rest,
            # report what we were owed and skip what was published before.
            cut = min(max(owed, self.next), start)
            self._lost.add(self._held.missing(self.next, cut), NOT_OWED)
            self._lost.add(self._held.missing(cut, start), EVICTED)
        self._learn(start, now)
        if sync is not None:
            self._learn(sync.next_seq, now)
        # Tell the publisher at once where we are: it keeps retained messages for us until then.
        self._schedule_ack(now, immediate=True)
        self._deliver(now)
        self._arm_nack(now)

    def _owed_from(self, start: int, sync: SyncInfo | None, now: float) -> int:
        """The first evicted seq that may have been published after `owed_since`, or `start`."""
        if sync is None:
            return start
        horizon_us = (now - self.owed_since) * 1e6
        # Ages were taken when the SYNC was encoded: transit makes them look younger (more
        # owed), never older, and they only decrease along the marks.
        for mark in sync.marks:
            if mark.age_us < horizon_us:
                return mark.seq
        return start

    def on_gap(self, ranges: RangeSet, now: float) -> None:
        """The publisher declares these sequence numbers lost."""
        for r in ranges:
            self._lost.add(self._held.missing(max(r.start, self.next), r.stop), NOT_REPAIRED)
        self._deliver(now)
        self._arm_nack(now)

    def on_mark(self, next_seq: int, limit: int, now: float) -> None:
        """A heartbeat: the publisher has sent up to `next_seq` and holds `limit` for us."""
        self._learn(next_seq, now)
        if self.synced and self.limit > limit:
            # Our last window update did not arrive: repeat it (TCP's persist, driven by the
            # publisher's heartbeats instead of a probe timer).
            self._schedule_ack(now, immediate=True)
        self._arm_nack(now)

    def on_consumed(self, upto: int, now: float) -> None:
        """The application took every message below `upto`: open the window further."""
        self.consumed = max(self.consumed, min(upto, self.next))
        self.account.consumed(self.consumed)
        cfg = self.host.config
        if self.limit - self.feedback.advertised >= max(1, cfg.receive_window // 4) or (
            self.account.released >= self.host.budget.peer_limit // 4
        ):
            # The publisher counts what we hold against our budget until it hears of this.
            self._schedule_ack(now, immediate=True)

    @property
    def limit(self) -> int:
        """The flow-control limit to advertise: sequence numbers below it are welcome."""
        if not self.synced:
            return 0  # no promise yet: the publisher keeps the limit it assumed
        return self.consumed + self.host.config.receive_window

    # -- timers ----------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When handle_timer next has work to do."""
        times = [t for t in (self.feedback.next_timer(), self._gap_deadline()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Send due acks and NACKs; give up holes that outlived gap_timeout."""
        deadline = self._gap_deadline()
        if deadline is not None and deadline <= now:
            self._expire_holes(now)
        feedback = self.feedback
        if feedback.ack_at is not None and feedback.ack_at <= now:
            self._send_ack(now)
        if feedback.nack_at is not None and feedback.nack_at <= now:
            feedback.send_nack(now, self._missing(), self.next)

    # -- delivery --------------------------------------------------------------------------

    def _sync(self, start: int) -> None:
        start = max(start, self._resume)
        self.synced = True
        self.next = start
        self.consumed = start
        for seq in [s for s in self._buffer if s < start]:
            self._drop(seq)
        self.account.passed(start)

    def _deliver(self, now: float) -> None:
        while self.synced:
            env = self._buffer.get(self.next)
            if env is None:
                if self.next not in self._lost:
                    return
                stop, reason = self._lost.run_at(self.next, self._held)
                if reason is None:
                    self._advance(stop)
                else:
                    self._gap(stop, reason)
                continue
            count = env.frag_count
            if env.kind == Kind.FRAGMENT and env.frag_index != 0:
                self._gap(self.next + 1, "fragment without the start of its message")
                continue
            if count > self.host.codec.max_fragments():
                self._gap(self.next + 1, f"message of {count} fragments exceeds the size limit")
                continue
            span = range(self.next, self.next + count)
            if self._lost.all.missing(span.start, span.stop).count() < count:
                missing = self._held.missing(span.start, span.stop)
                if missing:
                    # Part of the message is lost for good: the rest is useless.
                    self._gap(span.stop, "part of a fragmented message was lost")
                    continue
            if any(s not in self._buffer for s in span):
                return
            pieces = [self._buffer[s] for s in span]
            # Some pieces may be copies sent again: that flag is the piece's own.
            flags = env.flags & ~Flags.AGAIN
            if any(
                p.frag_index != i or p.frag_count != count or p.flags & ~Flags.AGAIN != flags
                for i, p in enumerate(pieces)
            ):
                self._gap(span.stop, "inconsistent fragments")
                continue
            payload = self._reassemble(pieces, env.flags, now)
            if payload is _STALLED:
                return
            if not isinstance(payload, bytes):
                self._gap(span.stop, str(payload))
                continue
            self._delivered(span, payload)

    def _delivered(self, span: range, payload: bytes) -> None:
        seq = self.next
        for s in span:
            self._drop(s)
        self.next = span.stop
        self.account.passed(self.next)
        if not self.host.config.flow_control:
            self.consumed = self.next
        else:
            self.account.delivered(span.stop, len(payload))
        self.host.stats.delivered += 1
        self.host.stats.delivered_bytes += len(payload)
        self.host.emit(
            Delivered(self.origin, self.stream, seq, payload, self.direct, end=span.stop)
        )

    def _reassemble(self, pieces: list[Envelope], flags: Flags, now: float) -> object:
        """The message, `_STALLED` while it waits for credit, or why it failed (a str)."""
        codec = self.host.codec
        try:
            declared = codec.declared_size(pieces[0].payload, flags)
            if declared is not None:
                verdict = self.account.decompression(
                    declared,
                    [len(p.payload) for p in pieces],
                    direct=self.direct,
                    max_message_size=codec.max_message_size,
                )
                if verdict is Decompression.WAIT:
                    self.host.stats.credit_stalls += 1
                    return _STALLED
                if verdict is not Decompression.FITS:
                    self.host.stats.decompression_refused += 1
                    if verdict is Decompression.HOSTILE:
                        self.host.refuse(self.origin, DECOMPRESSION_OVER_CREDIT, now)
                    return f"{DECOMPRESSION_OVER_CREDIT}: declares {declared} bytes"
            return codec.join([p.payload for p in pieces], flags, max_size=declared)
        except ReassemblyError as exc:
            self.host.stats.reassembly_failures += 1
            self.host.health(self.origin).on_checksum_failure(now)
            return f"reassembly failed: {exc.reason}"

    def retry(self, now: float) -> None:
        """The publisher's usage went down: try the message that waited for credit again."""
        self.account.stalled = False
        self._deliver(now)
        self._arm_nack(now)

    def _advance(self, stop: int) -> None:
        start = self.next
        # Below the delivery point nothing is asked for again: keep these sets small.
        self._lost.forget_below(stop)
        for seq in [s for s in self._buffer if start <= s < stop]:
            self._drop(seq)
        self.next = stop
        self.account.passed(stop)
        if self.consumed == start:
            # Nothing of a lost range waits for the application.
            self.consumed = stop
            self.account.consumed(stop)

    def _gap(self, stop: int, reason: str) -> None:
        start = self.next
        self._advance(stop)
        self.host.stats.gaps += 1
        self.host.stats.gap_seqs += stop - start
        self.host.emit(Gap(self.origin, self.stream, start, stop, reason, self.direct))

    def _drop(self, seq: int) -> None:
        env = self._buffer.pop(seq)
        self._held.subtract(seq, seq + 1)
        self.account.drop(len(env.payload))

    # -- lifetime --------------------------------------------------------------------------

    def idle(self, *, peer_present: bool) -> bool:
        """Nothing left to do: no hole, nothing buffered or due; consumed unless peer gone."""
        if self._buffer or self.feedback.next_timer() is not None:
            return False
        if not self.synced:
            return self.high_water == 0  # nothing it knows of to wait for
        if self.high_water > self.next or self._lost.all:
            return False
        return not (peer_present and self.account.unconsumed)

    def give_up(self, now: float) -> None:
        """Its publisher left for good: report every hole as lost, deliver what follows."""
        if self.synced:
            self._known.clear()
            self._lost.add(self._held.missing(self.next, self.high_water), TIMED_OUT)
            self._deliver(now)
            if self._buffer:  # a message that waited for credit that will not come now
                self._gap(max(self.high_water, max(self._buffer) + 1), "publisher left")

    def held_bytes(self) -> int:
        """What this receiver holds of its publisher's, recounted from what it keeps (the
        budget's running account must agree)."""
        buffered = sum(len(e.payload) + ENVELOPE_OVERHEAD for e in self._buffer.values())
        return buffered + self.account.unconsumed_bytes()

    def close(self) -> None:
        """Free everything charged to the budget: this receiver is dropped."""
        self._buffer.clear()
        self._held = RangeSet()
        self.account.close()

    # -- holes -----------------------------------------------------------------------------

    def _learn(self, high_water: int, now: float) -> None:
        if high_water <= self.high_water:
            return
        self.high_water = high_water
        if len(self._known) >= _MAX_KNOWN_MARKS:
            # Merging into the newest mark only delays expiry: safe, and bounded.
            self._known.pop()
        self._known.append((now, high_water))

    def _missing(self) -> RangeSet:
        if not self.synced:
            low = min(self._buffer, default=self.high_water)
            return RangeSet([range(0, low)]) if low > 0 else RangeSet()
        missing = self._held.missing(self.next, self.high_water)
        for r in self._lost.all:
            missing.subtract(r.start, r.stop)
        return missing

    def _gap_deadline(self) -> float | None:
        while self._known and self._known[0][1] <= self.next and self.synced:
            self._known.popleft()
        if not self._known:
            return None
        return self._known[0][0] + self.host.config.effective_gap_timeout

    def _expire_holes(self, now: float) -> None:
        timeout = self.host.config.effective_gap_timeout
        limit = 0
        # Same expression as _gap_deadline: `now - timeout` could round below it and livelock.
        while self._known and self._known[0][0] + timeout <= now:
            limit = max(limit, self._known.popleft()[1])
        if not self.synced:
            # No SYNC ever came: start from 0 and count everything before what we hold as lost.
            self._sync(0)
        self._lost.add(self._held.missing(self.next, limit), TIMED_OUT)
        self._deliver(now)
        self._arm_nack(now)

    # -- acks and NACKs --------------------------------------------------------------------

    def _schedule_ack(self, now: float, *, immediate: bool) -> None:
        self.feedback.schedule_ack(now, immediate=immediate)

    def _send_ack(self, now: float) -> None:
        held = RangeSet(r for r in self._held if r.start >= self.next)
        self.feedback.send_ack(now, self.next if self.synced else 0, held, self.limit)
        self.account.released = 0

    def _arm_nack(self, now: float) -> None:
        self.feedback.arm_nack(now, bool(self._missing()))
