"""The libp2p side: one trio loop that owns a py-libp2p host and drives the protocol Endpoint.

Everything here runs in the engine's own thread. The application talks to it through
`submit_*` methods (thread-safe: they queue and wake the trio loop) and hears back through an
`AppSink`, whose methods the engine schedules on the application's loop.

Flow of a message: application -> `submit_publish` -> Endpoint (sequence, window) -> frames
-> gossipsub (topics) or a long-lived direct stream (acks, repairs, point-to-point) -> remote
engine -> fault shim -> Endpoint (order, dedup, checksum) -> Delivered -> AppSink.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs
import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_uvarint

from discovery.peers import DialPlanner
from p2p_reliable import (
    Delivered,
    Endpoint,
    Gap,
    ProtocolConfig,
    Rejected,
    Unrecoverable,
    WindowFull,
    WindowOpen,
)

from .faults import FaultConfig, FaultShim
from .host import build_host, build_pubsub, listen_addrs

log = logging.getLogger("p2pr.engine")
# py-libp2p logs per message when gossipsub queues for peers not on a topic, and its
# auto-connector reports every second at INFO: both drown what our own logs say.
for _noisy in ("libp2p.pubsub.gossipsub", "libp2p.network.auto_connector"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# Every redial of a peer that is down (a killed node) logs an ERROR there; the dial planner
# counts failures and backs off, and the health table shows the peer as dead.
logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)

DIRECT_PROTOCOL = TProtocol("/p2pr/direct/1.0.0")

# py-libp2p's cost on a stream is per call, not per byte: every read sends a yamux
# WINDOW_UPDATE, every yamux frame is at least one Noise message. A yamux frame carries up to
# 65524 bytes, a Noise message 65519 of plaintext, so a full frame becomes two Noise messages
# (the second one 17 bytes). Writes of at most WRITE_CHUNK bytes make one frame, one message.
try:
    from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as _NOISE_PLAINTEXT
    from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as _YAMUX_HEADER
except ImportError:  # pragma: no cover - other py-libp2p layouts
    _NOISE_PLAINTEXT, _YAMUX_HEADER = 65535 - 16, 12
WRITE_CHUNK = _NOISE_PLAINTEXT - _YAMUX_HEADER
# Reads take whatever the stream holds, up to this much, and frames are cut from our buffer.
READ_CHUNK = 4 * 1024 * 1024


@attrs.frozen
class EngineConfig:
    """How the engine runs its host."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    bootstrap: tuple[str, ...] = ()
    static_peers: tuple[str, ...] = ()
    enable_mdns: bool = False
    # Shared by every node of a cluster: envelopes carry a keyed tag, strangers are refused.
    cluster_secret: bytes | None = None
    protocol: ProtocolConfig = attrs.field(factory=lambda: ProtocolConfig(flow_control=True))
    faults: FaultConfig | None = None
    psk: str | None = None
    # gossipsub's per-peer outbound queue holds 32 RPCs and silently rejects the rest:
    # we publish only while every queue holds at most this many.
    gossip_queue_high_water: int = 8
    # Frames waiting for one peer's direct stream. Beyond this they are dropped and counted;
    # the protocol retransmits them (the stream is stuck or the peer gone anyway).
    peer_queue_frames: int = 4096
    # New messages enter the protocol only while at most this many bytes wait for libp2p
    # (per topic set, per peer stream): retransmission timers start when a message enters,
    # so a long transport queue would make every timer fire early and flood the network.
    transport_backlog: int = 2 * 1024 * 1024
    # Topic frames at least this large go to each known subscriber over its direct stream
    # rather than through gossipsub, while the topic has at most bulk_max_subscribers. Measured
    # here: gossipsub signs, verifies and re-forwards every message, and moves 21 MB/s of
    # 256 KiB messages; direct streams move 53 MB/s. None: always gossipsub.
    bulk_unicast_bytes: int | None = 64 * 1024
    bulk_max_subscribers: int = 8
    subscriber_poll: float = 0.05
    redial_interval: float = 1.0


class AppSink(Protocol):
    """What the application hears; the engine calls these on the application's loop."""

    def delivered(self, event: Delivered) -> None: ...
    def accepted(self, count: int) -> None: ...
    def connection(self, peer: str, connected: bool) -> None: ...
    def protocol_event(self, event: Gap | Unrecoverable | Rejected) -> None: ...


@attrs.define
class EngineStats:
    """Transport-level counters (the protocol's own are in Endpoint.stats)."""

    published_frames: int = 0
    direct_frames_sent: int = 0
    frames_received: int = 0
    peer_queue_drops: int = 0
    stream_errors: int = 0
    oversized_frames: int = 0


@attrs.define
class _PeerLink:
    queue: deque[bytes] = attrs.Factory(deque)
    queued_bytes: int = 0
    wake: trio.Event = attrs.Factory(trio.Event)
    running: bool = False


class Engine:
    """A libp2p host plus the reliability Endpoint, in a trio loop on its own thread."""

    def __init__(
        self,
        key_pair: KeyPair,
        config: EngineConfig,
        sink: AppSink,
        post: Callable[..., None],
    ) -> None:
        self.key_pair = key_pair
        self.config = config
        self.sink = sink
        self._post = post  # schedules fn(*args) on the application's loop, thread-safe
        self.peer_id = ID.from_pubkey(key_pair.public_key)
        self.node_id = self.peer_id.to_base58()
        self.endpoint = Endpoint(
            self.node_id,
            epoch=time.time_ns() // 1_000_000,
            config=config.protocol,
            cluster_secret=config.cluster_secret,
        )
        self.planner = DialPlanner(self_id=self.node_id)
        self.connected: dict[str, str] = {}  # peer -> the address of its connection
        self._dial_wake = trio.Event()
        self.shim = FaultShim(config.faults)
        self.stats = EngineStats()
        self.addrs: list[str] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._inbox: deque[Callable[[], None]] = deque()
        self._inbox_lock = threading.Lock()
        self._wake_scheduled = False
        self._blocked: dict[tuple[str | None, str], deque[bytes]] = {}
        self._topics: set[str] = set()
        self._subscribers: dict[str, set[str]] = {}
        self._links: dict[str, _PeerLink] = {}
        self._gossip: deque[tuple[str, bytes]] = deque()
        self._gossip_bytes = 0
        self._gossip_wake = trio.Event()
        self._timer_changed = trio.Event()
        self._stopping = trio.Event()
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._nursery: trio.Nursery | None = None

    # -- thread-safe entry points (called from the application's thread) -------------------

    def submit_publish(self, topic: str, data: bytes) -> None:
        """Queue a broadcast on `topic`."""
        self._submit(lambda: self._offer(None, topic, data))

    def submit_send(self, peer: str, stream: str, data: bytes) -> None:
        """Queue a point-to-point message."""
        self._submit(lambda: self._offer(peer, stream, data))

    def submit_consumed(self, origin: str, stream: str, upto: int, direct: bool) -> None:
        """The application took `origin`'s messages below `upto`: grant more credit."""
        self._submit(lambda: self.endpoint.consumed(origin, stream, upto, self._now(), direct))

    def submit_subscribe(self, topic: str) -> None:
        """Subscribe to `topic` on the network."""
        self._submit(lambda: self._spawn(self._subscribe, topic))

    def submit_faults(self, config: FaultConfig) -> None:
        """Fault injection: change the shim's settings from now on (chaos runs)."""

        def apply() -> None:
            self.shim.config = config
            self.shim.rng = random.Random(config.seed)

        self._submit(apply)

    def submit_partition(self, peers: set[str]) -> None:
        """Fault injection: cut every frame to and from `peers` (empty set heals)."""
        self._submit(lambda: setattr(self.shim, "partitioned", set(peers)))

    def subscribers(self, topic: str) -> frozenset[str]:
        """Peers subscribed to `topic` (safe from any thread: the sets are replaced whole)."""
        return frozenset(self._subscribers.get(topic, ()))

    def query(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the engine's loop (where its state may be read safely)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self._submit(run)
        return future

    def idle(self) -> bool:
        """Nothing queued, blocked or unacknowledged (call on the engine's loop)."""
        return (
            not self._gossip
            and not any(self._blocked.values())
            and not any(link.queue for link in self._links.values())
            and self.endpoint.unacked() == 0
        )

    def stop(self) -> None:
        """Ask the engine to shut down; returns at once."""
        self._submit(self._stopping.set)

    def _submit(self, fn: Callable[[], None]) -> None:
        with self._inbox_lock:
            self._inbox.append(fn)
            if self._wake_scheduled or self._token is None:
                return
            self._wake_scheduled = True
        try:
            self._token.run_sync_soon(self._run_inbox)
        except trio.RunFinishedError:
            pass

    # -- the trio loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Thread body: run the host until stop()."""
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the application, which owns the thread
            self.error = exc
            log.exception("engine stopped with an error")
        finally:
            self.ready.set()

    async def _main(self) -> None:
        cfg = self.config
        self._token = trio.lowlevel.current_trio_token()
        addrs = listen_addrs(cfg.listen_host, cfg.listen_port)
        host = build_host(self.key_pair, addrs, cfg.psk, cfg.enable_mdns)
        pubsub, gossipsub = build_pubsub(host, self._app_score)
        self._host, self._pubsub = host, pubsub
        host.set_stream_handler(DIRECT_PROTOCOL, self._on_direct_stream)
        host.get_network().register_notifee(_ConnectionWatch(self))
        async with host.run(addrs), trio.open_nursery() as nursery:
            self._nursery = nursery
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                self.addrs = [str(a) for a in host.get_addrs()]
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._gossip_loop)
                nursery.start_soon(self._subscriber_poll)
                now = self._now()
                for source, configured in (
                    ("bootstrap", cfg.bootstrap),
                    ("static", cfg.static_peers),
                ):
                    for addr in configured:
                        self.planner.add(addr, source, now)
                if cfg.enable_mdns:
                    peerDiscovery.register_peer_discovered_handler(self._on_mdns_peer)
                nursery.start_soon(self._discovery_loop)
                self._run_inbox()
                self.ready.set()
                await self._stopping.wait()
                nursery.cancel_scope.cancel()
                if cfg.enable_mdns:
                    peerDiscovery.unregister_peer_discovered_handler(self._on_mdns_peer)
                # Leaving host.run() stops its tasks but leaves sockets to the garbage
                # collector; peers would not see us go. Close connections explicitly.
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await host.close()

    def _run_inbox(self) -> None:
        with self._inbox_lock:
            self._wake_scheduled = False
            work = list(self._inbox)
            self._inbox.clear()
        for fn in work:
            try:
                fn()
            except Exception:
                log.exception("engine command failed")
        self._flush()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    @staticmethod
    def _now() -> float:
        return trio.current_time()

    # -- protocol I/O ----------------------------------------------------------------------

    def _offer(self, peer: str | None, stream: str, data: bytes) -> None:
        key = (peer, stream)
        pending = self._blocked.get(key)
        if pending:
            pending.append(data)
            return
        if not self._try_send(peer, stream, data):
            self._blocked.setdefault(key, deque()).append(data)

    def _try_send(self, peer: str | None, stream: str, data: bytes) -> bool:
        if self._backlog(peer) > self.config.transport_backlog:
            return False
        now = self._now()
        try:
            if peer is None:
                self.endpoint.publish(stream, data, now)
            else:
                self.endpoint.send(peer, stream, data, now)
        except WindowFull:
            return False
        self._post(self.sink.accepted, 1)
        return True

    def _backlog(self, peer: str | None) -> int:
        if peer is None:
            # Topic frames may also travel on direct streams (bulk unicast).
            links = (link.queued_bytes for link in self._links.values())
            return self._gossip_bytes + max(links, default=0)
        link = self._links.get(peer)
        return link.queued_bytes if link is not None else 0

    def _transport_drained(self, peer: str | None) -> None:
        """libp2p took frames: admit messages that waited for transport room."""
        keys = [k for k, q in self._blocked.items() if q and k[0] in (peer, None)]
        if not keys:
            return
        for key in keys:
            if self._backlog(key[0]) <= self.config.transport_backlog // 2:
                self._retry_blocked(*key)
        self._flush()

    def _retry_blocked(self, peer: str | None, stream: str) -> None:
        pending = self._blocked.get((peer, stream))
        while pending:
            if not self._try_send(peer, stream, pending[0]):
                return
            pending.popleft()

    def _flush(self) -> None:
        """Hand what the Endpoint produced to libp2p and its events to the application."""
        now = self._now()
        for tx in self.endpoint.datagrams_to_send(now):
            if tx.topic is not None:
                bulk = self._bulk_targets(tx.topic, len(tx.data))
                if bulk:
                    for peer in bulk:
                        if not self.shim.blocks(peer):
                            self._queue_direct(peer, tx.data)
                    continue
                self._gossip.append((tx.topic, tx.data))
                self._gossip_bytes += len(tx.data)
                self._gossip_wake.set()
            elif tx.peer is not None and not self.shim.blocks(tx.peer):
                self._queue_direct(tx.peer, tx.data)
        while (event := self.endpoint.next_event()) is not None:
            if isinstance(event, Delivered):
                self._post(self.sink.delivered, event)
            elif isinstance(event, WindowOpen):
                self._retry_blocked(event.peer, event.stream)
            elif isinstance(event, Gap | Unrecoverable | Rejected):
                log.warning("%s", event)
                self._post(self.sink.protocol_event, event)
        self._timer_changed.set()

    def _bulk_targets(self, topic: str, size: int) -> frozenset[str]:
        threshold = self.config.bulk_unicast_bytes
        if threshold is None or size < threshold:
            return frozenset()
        subscribers = self.subscribers(topic)
        if len(subscribers) > self.config.bulk_max_subscribers:
            return frozenset()
        return subscribers

    def _receive(self, data: bytes, peer: str) -> None:
        self.stats.frames_received += 1
        for delay, frame in self.shim.inbound(data, peer):
            if delay > 0:
                self._spawn(self._receive_later, delay, frame, peer)
            else:
                self.endpoint.receive(frame, peer, self._now())
        self._flush()

    async def _receive_later(self, delay: float, frame: bytes, peer: str) -> None:
        await trio.sleep(delay)
        self.endpoint.receive(frame, peer, self._now())
        self._flush()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.endpoint.get_timer()
            self._timer_changed = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._timer_changed.wait()
            now = self._now()
            if deadline is not None and now >= deadline:
                self.endpoint.handle_timer(now)
                self._flush()

    # -- gossipsub -------------------------------------------------------------------------

    async def _subscribe(self, topic: str) -> None:
        assert self._pubsub is not None
        if topic in self._topics:
            return
        self._topics.add(topic)
        self.endpoint.subscribe(topic, self._now())
        subscription = await self._pubsub.subscribe(topic)
        own = self.peer_id.to_bytes()
        # Drain at once, always: py-libp2p's subscription channel holds 32 messages and
        # drops the rest with only a warning.
        async for msg in subscription:
            if msg.from_id == own:
                continue
            try:
                origin = ID(msg.from_id).to_base58()
            except Exception:
                self.stats.stream_errors += 1
                continue
            self._receive(msg.data, origin)

    async def _gossip_loop(self) -> None:
        assert self._pubsub is not None
        pubsub = self._pubsub
        high = self.config.gossip_queue_high_water
        while True:
            while not self._gossip:
                self._gossip_wake = trio.Event()
                await self._gossip_wake.wait()
            # Never let gossipsub's outbound queues reject: wait for room instead.
            while any(len(q) > high for q in pubsub.peer_queues.values()):
                await trio.sleep(0.001)
            topic, data = self._gossip.popleft()
            await pubsub.publish(topic, data)
            self._gossip_bytes -= len(data)
            self.stats.published_frames += 1
            self._transport_drained(None)

    async def _subscriber_poll(self) -> None:
        # py-libp2p has no subscription callback; its peer_topics map is the truth.
        assert self._pubsub is not None
        while True:
            now = self._now()
            changed = False
            for topic in self._topics:
                current = {p.to_base58() for p in self._pubsub.peer_topics.get(topic, ())}
                known = self._subscribers.setdefault(topic, set())
                if current == known:
                    continue
                for peer in current - known:
                    self.endpoint.add_subscriber(topic, peer, now)
                for peer in known - current:
                    self.endpoint.remove_subscriber(topic, peer, now)
                self._subscribers[topic] = current
                changed = True
            if changed:
                self._flush()
            await trio.sleep(self.config.subscriber_poll)

    # -- direct streams --------------------------------------------------------------------

    def _queue_direct(self, peer: str, data: bytes) -> None:
        link = self._links.setdefault(peer, _PeerLink())
        if len(link.queue) >= self.config.peer_queue_frames:
            self.stats.peer_queue_drops += 1
            return
        link.queue.append(data)
        link.queued_bytes += len(data)
        link.wake.set()
        if not link.running:
            link.running = True
            self._spawn(self._peer_writer, peer, link)

    async def _peer_writer(self, peer: str, link: _PeerLink) -> None:
        assert self._host is not None
        stream: INetStream | None = None
        try:
            while True:
                while not link.queue:
                    link.wake = trio.Event()
                    await link.wake.wait()
                if stream is None:
                    stream = await self._host.new_stream(ID.from_base58(peer), [DIRECT_PROTOCOL])
                # Coalesce whatever is queued, then write it in pieces of one yamux frame and
                # one Noise message each: py-libp2p's cost is per frame and per message.
                frames = _take(link.queue, 64)
                for piece in _pieces(frames, WRITE_CHUNK):
                    await stream.write(piece)
                link.queued_bytes -= sum(len(f) for f in frames)
                self.stats.direct_frames_sent += len(frames)
                self._transport_drained(peer)
        except Exception as exc:
            self.stats.stream_errors += 1
            self.stats.peer_queue_drops += len(link.queue)
            link.queue.clear()
            link.queued_bytes = 0
            log.info("direct stream to %s ended: %s", peer, exc)
        finally:
            link.running = False
            if stream is not None:
                with trio.move_on_after(1):
                    await stream.reset()

    async def _on_direct_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        limit = self.config.protocol.max_frame_bytes + 4096
        buffer = bytearray()
        try:
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    return
                buffer += chunk
                # One read usually brings several frames (or the rest of a large one).
                used = 0
                while (frame := _cut_frame(buffer, used, limit)) is not None:
                    data, used = frame
                    self._receive(data, peer)
                if used:
                    del buffer[:used]
        except Exception as exc:
            log.debug("direct stream from %s closed: %s", peer, exc)

    # -- peers -----------------------------------------------------------------------------

    def _peer_connected(self, peer: str, address: str | None) -> None:
        self.connected[peer] = self.connected.get(peer) or address or "?"
        self.endpoint.add_peer(peer, self._now())
        self._post(self.sink.connection, peer, True)
        self._flush()

    def _peer_disconnected(self, peer: str) -> None:
        assert self._host is not None
        if self._host.get_network().get_connections(ID.from_base58(peer)):
            return  # another connection to the same peer is still up
        self.connected.pop(peer, None)
        self.planner.on_disconnected(peer, self._now())
        self._dial_wake.set()
        self.endpoint.remove_peer(peer, self._now())
        self._post(self.sink.connection, peer, False)
        self._flush()

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        """Learn a peer address (thread-safe)."""
        self._submit(lambda: self._learn_addr(addr, source))

    def _learn_addr(self, addr: str, source: str) -> None:
        if self.planner.add(addr, source, self._now()):
            self._dial_wake.set()

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        # Called on zeroconf's thread, for every engine of this process: hop to ours.
        for addr in info.addrs:
            self.add_peer_addr(f"{addr}/p2p/{info.peer_id.to_base58()}", "mdns")

    async def _discovery_loop(self) -> None:
        while True:
            now = self._now()
            for state in self.planner.due(now, self.connected):
                self._spawn(self._dial, state.addr)
            # next_time must skip connected peers as due() does, or this loop never sleeps.
            planned = self.planner.next_time(self.connected)
            wake_at = max(now + 0.01, min(planned or math.inf, now + self.config.redial_interval))
            self._dial_wake = trio.Event()
            with trio.move_on_at(wake_at):
                await self._dial_wake.wait()

    async def _dial(self, addr: str) -> None:
        assert self._host is not None
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        ok = False
        try:
            with trio.fail_after(5):
                await self._host.connect(info)
            ok = True
            self.connected.setdefault(info.peer_id.to_base58(), addr)
        except Exception as exc:
            log.info("could not reach %s: %s", addr, exc)
        self.planner.on_result(addr, ok, self._now())
        if not ok and addr in self.planner.dropped:
            log.warning("forgot %s: it kept failing (a stale mDNS entry?)", addr)
            peer = info.peer_id.to_base58()
            if not any(s.peer == peer for s in self.planner.addresses.values()):
                self._host.get_peerstore().clear_addrs(info.peer_id)
        self._dial_wake.set()

    def _app_score(self, peer: ID) -> float:
        return self.endpoint.health(peer.to_base58()).score(self._now())

    def health_view(self) -> list[dict[str, Any]]:
        """Every known peer's health, JSON-friendly (call on the engine's loop)."""
        now = self._now()
        twins = set(self.endpoint.duplicate_origins(now))
        out = []
        for snapshot in self.endpoint.healths.snapshots(now):
            row = snapshot.to_dict()
            if snapshot.last_seen is not None:
                row["last_seen_s_ago"] = round(now - snapshot.last_seen, 3)
            row["address"] = self.connected.get(snapshot.peer)
            row["connected"] = snapshot.peer in self.connected
            row["listen_addrs"] = self._listen_addrs_of(snapshot.peer)
            row["duplicate"] = snapshot.peer in twins
            out.append(row)
        return out

    def health_states(self) -> dict[str, str]:
        """Every known peer's state name, as in `health_view` (call on the engine's loop)."""
        return {
            peer: state.name for peer, state in self.endpoint.healths.states(self._now()).items()
        }

    def _listen_addrs_of(self, peer: str) -> list[str]:
        # Identify fills the peerstore with the addresses a peer listens on: what others need
        # to reach it (a connection's own address may be an ephemeral outgoing port).
        if self._host is None:
            return []
        try:
            addrs = self._host.get_peerstore().addrs(ID.from_base58(peer))
        except Exception:
            return []
        out = []
        for addr in addrs:
            text = str(addr)
            out.append(text if "/p2p/" in text else f"{text}/p2p/{peer}")
        return out


def _take(queue: deque[bytes], n: int) -> list[bytes]:
    return [queue.popleft() for _ in range(min(n, len(queue)))]


def _pieces(frames: list[bytes], size: int) -> Iterator[bytes]:
    """The varint-prefixed frames back to back, cut into pieces of at most `size` bytes.

    Every byte is copied once, into its piece: no joined buffer of all the frames (megabytes,
    a fresh allocation each time) is built first.
    """
    parts: list[memoryview] = []
    room = size
    for frame in frames:
        for part in (encode_uvarint(len(frame)), frame):
            view = memoryview(part)
            while view:
                take = view[:room]
                parts.append(take)
                room -= len(take)
                view = view[len(take) :]
                if not room:
                    yield b"".join(parts)
                    parts, room = [], size
    if parts:
        yield b"".join(parts)


class FrameTooLarge(ValueError):
    """A direct-stream frame announced more bytes than any valid frame has."""


def _cut_frame(buffer: bytearray, pos: int, limit: int) -> tuple[bytes, int] | None:
    """The varint-prefixed frame at `pos` and the position after it, or None if incomplete.

    Raises FrameTooLarge (or ValueError for a varint over 64 bits) as soon as the prefix
    says so, before any of the body is awaited.
    """
    length = 0
    shift = 0
    index = pos
    end = len(buffer)
    while True:
        if index >= end:
            return None
        byte = buffer[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 64:
            raise ValueError("varint frame length over 64 bits")
    if length > limit:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {limit}")
    stop = index + length
    if stop > end:
        return None
    with memoryview(buffer) as view, view[index:stop] as body:
        return bytes(body), stop


class _ConnectionWatch(INotifee):
    """Turns libp2p connection notifications into engine calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        try:
            address: str | None = str(conn.get_transport_addresses()[0])
        except Exception:
            address = None
        self.engine._peer_connected(conn.muxed_conn.peer_id.to_base58(), address)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.engine._peer_disconnected(conn.muxed_conn.peer_id.to_base58())
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()
