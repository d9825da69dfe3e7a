"""One node's protocol state machine: bytes and time in, bytes out, timers and events.

The shape is aioquic's QuicConnection: `receive(data, from_peer, now)`,
`datagrams_to_send(now)`, `get_timer()`, `handle_timer(now)`, `next_event()`, plus the
application calls `publish`/`send`. There is no socket, task or clock in here, so any schedule
of faults can be replayed exactly in tests.
"""

from __future__ import annotations

import math
import random
from collections import deque

import attrs

from .budget import ENVELOPE_OVERHEAD, ReceiveBudget, SendLedger, message_cost
from .config import ProtocolConfig
from .congestion import DelayWindow
from .control import decode_ack, decode_heartbeat, decode_ranges, decode_sync, encode_heartbeat
from .envelope import (
    AuthError,
    ChecksumError,
    DecodeError,
    Envelope,
    EnvelopeCodec,
    Kind,
    decode_batch,
    encode_batch,
)
from .events import Event, Rejected, Unrecoverable
from .fragment import MessageCodec
from .health import HealthTable, PeerHealth
from .inbound import InboundStreams
from .receiver import StreamReceiver
from .recovery import RttEstimator
from .retention import RetentionBudget
from .sender import StreamSender, WindowFull
from .stats import EndpointStats
from .timers import TimerQueue
from .twins import TwinDetector


@attrs.frozen
class Transmit:
    """Bytes to hand to the transport: to one peer directly, or published on a topic."""

    data: bytes
    peer: str | None = None
    topic: str | None = None


class Endpoint:
    """The reliability protocol for one node, sans I/O.

    `epoch` identifies this run of the node (a restart must use a larger one, e.g. the start
    time in milliseconds): receivers reset their state when a publisher's epoch grows.
    """

    def __init__(
        self,
        node_id: str,
        *,
        epoch: int,
        config: ProtocolConfig | None = None,
        seed: int | None = None,
        cluster_secret: bytes | None = None,
    ) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.config = config or ProtocolConfig()
        self.codec = MessageCodec(
            max_fragment_payload=self.config.max_fragment_payload,
            max_message_size=self.config.max_message_size,
            compress_threshold=self.config.compress_threshold,
            compress_level=self.config.compress_level,
            # What a receiver whose budget for us is empty decompresses.
            compress_max_size=self.config.peer_receive_bytes - ENVELOPE_OVERHEAD,
        )
        self.stats = EndpointStats()
        # With a cluster secret, envelopes are tagged and foreign ones refused (AuthError).
        self.envelopes = EnvelopeCodec(cluster_secret)
        self.rng = random.Random(seed)
        self.healths = HealthTable(self.config.health)
        self.retention = RetentionBudget(self.config.retain_total_bytes)
        cfg = self.config
        # Receive bounds (README "Receive bounds"), and the publisher's side of them.
        self.budget = ReceiveBudget(
            cfg.peer_receive_bytes,
            cfg.total_receive_bytes,
            slack=message_cost(cfg.max_message_size, cfg.max_fragment_payload),
        )
        self.ledger = SendLedger(cfg.peer_receive_bytes)
        self._rtt: dict[str, RttEstimator] = {}
        self._congestion: dict[str, DelayWindow] = {}
        self._peers: dict[str, float] = {}  # peer -> when the connection came up
        self._subscriptions: dict[str, float] = {}  # topic -> when we subscribed
        self._subscribers: dict[str, set[str]] = {}
        self._topics: dict[str, StreamSender] = {}
        self._directs: dict[tuple[str, str], StreamSender] = {}
        self._directs_to: dict[str, dict[str, StreamSender]] = {}  # the same, by destination
        self._blocked: dict[StreamSender, None] = {}  # senders that refused a send
        self.timers: TimerQueue[StreamSender | StreamReceiver] = TimerQueue()
        self.streams = InboundStreams(self)
        self._outbox: list[Transmit] = []
        self._events: deque[Event] = deque()
        self._next_heartbeat: float | None = None
        # Two epochs of one origin heard interleaved mean two running nodes with one identity
        # (a cloned key); a restart (one epoch after the other) or a pause does not.
        self._twins = TwinDetector()

    # -- membership ------------------------------------------------------------------------

    def add_peer(self, peer: str, now: float) -> None:
        """A transport connection to `peer` exists: heartbeat it and track its health."""
        # A subscription cannot reach a publisher before a connection does: its messages are
        # owed to us from the later of the two (a second connection changes nothing).
        self._peers.setdefault(peer, now)
        self.healths.get(peer)
        if self._next_heartbeat is None:
            self._next_heartbeat = now

    def remove_peer(self, peer: str, now: float) -> None:
        """`peer` is gone: everything still owed to it becomes Unrecoverable at once."""
        self._peers.pop(peer, None)
        self.health(peer).on_stream_reset(now)
        for subscribers in self._subscribers.values():
            subscribers.discard(peer)
        # Its receivers stay until idle (it may come back): the sweep frees them.
        for sender in [*self._topics.values(), *self._directs_to.get(peer, {}).values()]:
            sender.remove_receiver(peer, now, "peer removed")
            self.timers.touch(sender)
        self._check_blocked()

    def unacked(self) -> int:
        """Sequence numbers sent and not yet acknowledged (or given up), over all streams."""
        return self.ledger.unacked

    def peers(self) -> list[str]:
        """Known peers."""
        return sorted(self._peers)

    def subscribe(self, topic: str, now: float | None = None) -> None:
        """Accept messages published on `topic`: every one published after `now` is owed to us.

        A publisher's messages are owed from the later of `now` and our connection to it
        (add_peer). Without `now` that is the connection alone: a publisher that learns of us
        late then reports as lost whatever it let go since the connection.
        """
        self._subscriptions.setdefault(topic, -math.inf if now is None else now)

    def unsubscribe(self, topic: str) -> None:
        """Stop accepting `topic`; its receive state is dropped, its delivery points kept."""
        self._subscriptions.pop(topic, None)
        self.streams.unsubscribed(topic)

    def add_subscriber(self, topic: str, peer: str, now: float) -> None:
        """`peer` receives our messages on `topic`: wait for its acks from the next message."""
        self._subscribers.setdefault(topic, set()).add(peer)
        if topic in self._topics:
            self._topics[topic].add_receiver(peer, now)
            self.timers.touch(self._topics[topic])

    def remove_subscriber(self, topic: str, peer: str, now: float) -> None:
        """`peer` left `topic`: stop waiting for it."""
        self._subscribers.get(topic, set()).discard(peer)
        if topic in self._topics:
            self._topics[topic].remove_receiver(peer, now, "unsubscribed")
            self.timers.touch(self._topics[topic])
            self._check_blocked()

    # -- application sends -----------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, now: float, *, redundant: bool | None = None
    ) -> int:
        """Broadcast `payload` on `topic`; return its sequence number or raise WindowFull.

        `redundant`: send it twice (see `ProtocolConfig.redundant_streams`); None: as the
        configuration says for `topic`.
        """
        sender = self._topics.get(topic)
        if sender is None:
            sender = StreamSender(
                self, name=topic, origin=self.node_id, epoch=self.epoch, dest=None
            )
            self._topics[topic] = sender
            for peer in sorted(self._subscribers.get(topic, ())):
                sender.add_receiver(peer, now)
        return self._send(sender, payload, now, redundant)

    def send(
        self, peer: str, stream: str, payload: bytes, now: float, *, redundant: bool | None = None
    ) -> int:
        """Send `payload` to `peer` alone on a direct stream; return its sequence number.

        `redundant`: as for `publish`.
        """
        sender = self._directs.get((peer, stream))
        if sender is None:
            sender = StreamSender(
                self, name=stream, origin=self.node_id, epoch=self.epoch, dest=peer
            )
            self._directs[(peer, stream)] = sender
            self._directs_to.setdefault(peer, {})[stream] = sender
        return self._send(sender, payload, now, redundant)

    def can_publish(self, topic: str, size: int = 0) -> bool:
        """Whether `publish` would accept a message of `size` bytes now."""
        sender = self._topics.get(topic)
        if sender is None:  # a new stream: only its receivers' byte budgets can refuse it
            return all(self._fits(peer, size) for peer in self._subscribers.get(topic, ()))
        return not sender.blocking_receivers(size)

    def can_send(self, peer: str, stream: str, size: int = 0) -> bool:
        """Whether `send` would accept a message of `size` bytes now."""
        sender = self._directs.get((peer, stream))
        return self._fits(peer, size) if sender is None else not sender.blocking_receivers(size)

    def _fits(self, peer: str, size: int) -> bool:
        return self.ledger.fits(peer, message_cost(size, self.config.max_fragment_payload))

    def _send(
        self, sender: StreamSender, payload: bytes, now: float, redundant: bool | None
    ) -> int:
        if redundant is None:
            redundant = sender.name in self.config.redundant_streams
        try:
            seq = sender.send(payload, now, redundant=redundant)
        except WindowFull:
            self.stats.window_full += 1
            self._blocked[sender] = None
            raise
        self.timers.touch(sender)
        self.stats.messages_sent += 1
        return seq

    # -- input -----------------------------------------------------------------------------

    def receive(
        self, data: bytes, from_peer: str, now: float, arrived: float | None = None
    ) -> None:
        """Feed a frame received from `from_peer` (the transport-authenticated sender).

        `arrived`: when the transport took the frame in, if it waited before this call (in
        a queue, behind other work): acks report that wait as ack delay, so that the
        publisher's RTT samples measure the network, not this node's backlog.
        """
        try:
            items = decode_batch(data)
        except DecodeError as exc:
            self._reject(from_peer, exc, now)
            return
        for raw in items:
            try:
                env = self.envelopes.decode(raw)
            except DecodeError as exc:
                self._reject(from_peer, exc, now)
                continue
            if env.origin != from_peer:
                self.stats.spoofed += 1
                self.health(from_peer).on_rejected(now, "origin mismatch")
                self._events.append(Rejected(from_peer, "origin mismatch"))
                continue
            self.health(from_peer).on_received(now)
            if env.kind not in (Kind.ACK, Kind.NACK):
                # ACKs and NACKs carry the epoch of the stream they answer, not their sender's.
                self._note_epoch(env.origin, env.epoch, now)
            self._dispatch(env, now, arrived)
        self.streams.wake_stalled(now)

    def _note_epoch(self, origin: str, epoch: int, now: float) -> None:
        self._twins.heard(origin, epoch, now)

    def duplicate_origins(self, now: float) -> list[str]:
        """Peers heard from two runs (epochs) at once, recently: one identity on two nodes."""
        return self._twins.twins(now)

    def _reject(self, peer: str, exc: DecodeError, now: float) -> None:
        if isinstance(exc, AuthError):
            self.stats.auth_rejected += 1
            self.health(peer).on_rejected(now, "cluster secret")
        elif isinstance(exc, ChecksumError):
            self.stats.corrupted += 1
            self.health(peer).on_checksum_failure(now)
        else:
            self.stats.malformed += 1
            self.health(peer).on_decode_error(now)
        self._events.append(Rejected(peer, exc.reason))

    def _dispatch(self, env: Envelope, now: float, arrived: float | None = None) -> None:
        key = (env.origin, env.stream, env.direct)
        try:
            if env.kind in (Kind.DATA, Kind.FRAGMENT):
                if rcv := self.streams.receiver(key, env.epoch, now):
                    rcv.on_data(env, now, arrived)
            elif env.kind in (Kind.ACK, Kind.NACK):
                self._feedback(env, now)
            elif env.kind == Kind.SYNC:
                sync = decode_sync(env.payload, env.seq)
                if rcv := self.streams.receiver(key, env.epoch, now):
                    rcv.on_sync(env.seq, sync, now)
            elif env.kind == Kind.GAP:
                if rcv := self.streams.receiver(key, env.epoch, now):
                    rcv.on_gap(decode_ranges(env.payload), now)
            elif env.kind == Kind.HEARTBEAT:
                self.health(env.origin).on_heartbeat(now)
                for mark in decode_heartbeat(env.payload):
                    mark_key = (env.origin, mark.stream, mark.flags != 0)
                    rcv = self.streams.receiver(mark_key, mark.epoch, now, mark=mark.next_seq)
                    if rcv is not None:
                        rcv.on_mark(mark.next_seq, mark.limit, now)
        except DecodeError as exc:
            self._reject(env.origin, exc, now)

    def _feedback(self, env: Envelope, now: float) -> None:
        if env.direct:
            sender = self._directs.get((env.origin, env.stream))
        else:
            sender = self._topics.get(env.stream)
        if sender is None or env.epoch != self.epoch:
            self.stats.stale_epoch += sender is not None
            self.stats.unknown_stream += sender is None
            return
        self.timers.touch(sender)
        if env.kind == Kind.ACK:
            self.stats.acks_received += 1
            sender.on_ack(env.origin, decode_ack(env.payload), now)
            self._check_blocked()  # the byte credit it carries is shared by all streams
        else:
            self.stats.nacks_received += 1
            sender.on_nack(env.origin, decode_ranges(env.payload), now)

    def _check_blocked(self) -> None:
        for sender in list(self._blocked):
            if not sender.check_window():
                del self._blocked[sender]

    def consumed(
        self, origin: str, stream: str, upto: int, now: float, direct: bool = False
    ) -> None:
        """With `flow_control`: the application took `origin`'s messages below seq `upto`."""
        rcv = self.streams.get((origin, stream, direct))
        if rcv is not None:
            rcv.on_consumed(upto, now)
            self.timers.touch(rcv)
            self.streams.wake_stalled(now)

    def inbound(self, origin: str, stream: str, direct: bool = False) -> StreamReceiver | None:
        """The receive state of one publisher's stream, if any arrived (and was not freed)."""
        return self.streams.get((origin, stream, direct))

    def outbound(self, topic: str) -> StreamSender | None:
        """The publishing state of `topic`, once something was published on it."""
        return self._topics.get(topic)

    # -- output, timers, events ------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """Everything to transmit now, coalesced per destination into frames."""
        batches: dict[tuple[str | None, str | None], list[bytes]] = {}
        sizes: dict[tuple[str | None, str | None], int] = {}
        out: list[Transmit] = []
        for item in self._outbox:
            dest = (item.peer, item.topic)
            batch = batches.get(dest)
            if batch is not None and sizes[dest] + len(item.data) > self.config.max_frame_bytes:
                out.append(Transmit(encode_batch(batch), *dest))
                batch = None
            if batch is None:
                batch = batches[dest] = []
                sizes[dest] = 0
            batch.append(item.data)
            sizes[dest] += len(item.data)
        out.extend(Transmit(encode_batch(items), *dest) for dest, items in batches.items())
        self._outbox.clear()
        return out

    def get_timer(self) -> float | None:
        """The earliest time at which handle_timer must be called."""
        times = [t for t in (self._next_heartbeat, self.timers.earliest()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due."""
        for machine in self.timers.pop_due(now):
            machine.handle_timer(now)
        if self._next_heartbeat is not None and self._next_heartbeat <= now:
            self._heartbeat(now)  # after the machines: the sweep sees their acks sent
        self._check_blocked()
        self.streams.wake_stalled(now)

    def next_event(self) -> Event | None:
        """The next event for the application, or None."""
        return self._events.popleft() if self._events else None

    def _heartbeat(self, now: float) -> None:
        for sender in self._topics.values():
            sender.expire(now)
        self.streams.sweep(now)
        for peer in sorted(self._peers):
            marks = [s.mark(peer) for s in self._topics.values() if s.serves(peer)]
            marks += [s.mark(peer) for s in self._directs_to.get(peer, {}).values()]
            env = Envelope(
                kind=Kind.HEARTBEAT,
                origin=self.node_id,
                stream="",
                epoch=self.epoch,
                seq=0,
                payload=encode_heartbeat(marks),
            )
            self.transmit(peer, None, self.envelopes.encode(env))
        self._next_heartbeat = now + self.config.heartbeat_interval

    # -- the host interface used by StreamSender / StreamReceiver --------------------------

    def emit(self, event: Event) -> None:
        """Queue an event for the application."""
        if isinstance(event, Unrecoverable):
            self.stats.unrecoverable += 1
        self._events.append(event)

    def transmit(self, peer: str | None, topic: str | None, data: bytes) -> None:
        """Queue encoded envelope bytes for datagrams_to_send."""
        self.stats.envelopes_sent += 1
        self.stats.bytes_sent += len(data)
        self._outbox.append(Transmit(data, peer, topic))

    def rtt(self, peer: str) -> RttEstimator:
        """The RTT estimator for `peer`."""
        est = self._rtt.get(peer)
        if est is None:
            est = self._rtt[peer] = RttEstimator(self.config.retry)
        return est

    def congestion(self, peer: str) -> DelayWindow:
        """The delay-based window towards `peer`."""
        window = self._congestion.get(peer)
        if window is None:
            cfg = self.config
            window = self._congestion[peer] = DelayWindow(
                cfg.queue_delay_target, cfg.min_window_bytes, cfg.window_bytes
            )
        return window

    def health(self, peer: str) -> PeerHealth:
        """The health record for `peer`."""
        return self.healths.get(peer)

    def connected(self, peer: str) -> bool:
        """Whether a transport connection to `peer` exists (add_peer, not yet removed)."""
        return peer in self._peers

    def owed_since(self, origin: str, stream: str) -> float | None:
        """Since when `origin`'s messages on topic `stream` are owed to us; None: not
        subscribed."""
        subscribed = self._subscriptions.get(stream)
        if subscribed is None:
            return None
        return max(subscribed, self._peers.get(origin, -math.inf))

    def refuse(self, peer: str, reason: str, now: float) -> None:
        """Input from `peer` broke a bound it was told of: count it and tell the application."""
        self.health(peer).on_rejected(now, reason)
        self._events.append(Rejected(peer, reason))
