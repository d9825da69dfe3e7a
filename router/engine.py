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
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from discovery.peers import DialPlanner
from p2p_reliable import (
    Delivered,
    Endpoint,
    Gap,
    PeerState,
    ProtocolConfig,
    Rejected,
    Unrecoverable,
    WindowFull,
    WindowOpen,
)

from .dialer import Dialer
from .directs import DirectLimits, DirectTransport, start_soon
from .faults import FaultConfig, FaultShim
from .host import build_host, build_pubsub, listen_addrs
from .liveness import LivenessConfig
from .membership import Hello, MembershipChange, Role
from .peerwatch import PeerWatch
from .penalty import PenaltyBox, PenaltyConfig
from .ratelog import RateLimitedLog
from .rejections import RejectionCounter

log = logging.getLogger("p2pr.engine")
# py-libp2p logs per message when gossipsub queues for peers not on a topic, and its
# auto-connector reports every second at INFO: both drown what our own logs say.
for _noisy in ("libp2p.pubsub.gossipsub", "libp2p.network.auto_connector"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# Every redial of a peer that is down (a killed node) logs an ERROR there; the dial planner
# counts failures and backs off, and the health table shows the peer as dead.
logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
# A stream that cannot be opened (a peer that does not speak the protocol, or is going away)
# is logged there as a 7-line ERROR; the caller gets StreamFailure, and ours handle it.
logging.getLogger("libp2p.host.basic_host").setLevel(logging.CRITICAL)


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
    # Streams (all protocols, both directions) one peer may have open at once: py-libp2p's
    # stream limit is global, so one peer must not be able to use it up for everyone.
    max_streams_per_peer: int = 64
    # What one peer may make this node hold on its direct streams (router/directs.py).
    direct: DirectLimits = attrs.field(factory=DirectLimits)
    # A peer that keeps sending refused input is cut off for a while (router/penalty.py).
    penalty: PenaltyConfig = attrs.field(factory=PenaltyConfig)
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
    # A member takes part in the cluster; an observer (`p2pr health`) only watches: peers
    # never announce it to their applications (exo would elect a new master on it).
    role: Role = Role.MEMBER
    # When a silent peer is found hung and its connection closed (router/liveness.py).
    liveness: LivenessConfig = attrs.field(factory=LivenessConfig)


# Refusals an honest peer can cause: damaged envelopes (what a bad link or the fault shim
# does) and our own total stream cap. They are counted (the peer's health) but never count
# towards cutting the peer off.
_NOT_HOSTILE = ("checksum", "too many inbound streams")


class AppSink(Protocol):
    """What the application hears; the engine calls these on the application's loop."""

    def delivered(self, event: Delivered) -> None: ...
    def accepted(self, count: int) -> None: ...
    def connection(self, peer: str, connected: bool) -> None: ...
    def protocol_event(self, event: Gap | Unrecoverable | Rejected) -> None: ...


@attrs.define
class EngineStats:
    """Transport-level counters (the protocol's own are in Endpoint.stats, the direct
    streams' in Engine.directs.stats)."""

    published_frames: int = 0
    frames_received: int = 0
    stream_errors: int = 0
    peers_cut_off: int = 0


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
        self.connected: dict[str, str] = {}  # peer -> the address of its connection
        self.dialer = Dialer(self.node_id, config.redial_interval, lambda: self.connected)
        self.peers = PeerWatch(
            config.liveness,
            self._own_hello,
            self._apply_membership,
            self._liveness_input,
            reject=lambda peer, kind: self.reject(peer, kind),
        )
        self.shim = FaultShim(config.faults)
        self.stats = EngineStats()
        self.rejections = RejectionCounter()
        self.penalties = PenaltyBox(config.penalty)
        self._events_log = RateLimitedLog(log)
        self.directs = DirectTransport(
            config.direct,
            config.protocol.max_frame_bytes + 4096,
            receive=self._receive,
            drained=self._transport_drained,
            reject=self.reject,
        )
        self.addrs: list[str] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._inbox: deque[Callable[[], None]] = deque()
        self._inbox_lock = threading.Lock()
        self._wake_scheduled = False
        self._blocked: dict[tuple[str | None, str], deque[bytes]] = {}
        self._topics: set[str] = set()
        self._hello_seq = 0
        # Subscribers of each topic: what gossipsub reports, united with what peers' hellos
        # say (the sets are replaced whole, so other threads may read them).
        self._subscribers: dict[str, frozenset[str]] = {}
        self._gossip_subscribers: dict[str, set[str]] = {}
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

    def submit_call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine's loop (thread-safe; its result is not returned)."""
        self._submit(fn)

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
            and self.directs.idle()
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
        pubsub, gossipsub = build_pubsub(host, self._app_score, self.reject)
        self._host, self._pubsub = host, pubsub
        host.get_network().register_notifee(_ConnectionWatch(self))
        async with host.run(addrs), trio.open_nursery() as nursery:
            self._nursery = nursery
            self.peers.start(host, nursery)
            self.directs.start(host, nursery)
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                self.addrs = [str(a) for a in host.get_addrs()]
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._gossip_loop)
                nursery.start_soon(self._subscriber_poll)
                for source, configured in (
                    ("bootstrap", cfg.bootstrap),
                    ("static", cfg.static_peers),
                ):
                    for addr in configured:
                        self.dialer.add(addr, source)
                if cfg.enable_mdns:
                    peerDiscovery.register_peer_discovered_handler(self._on_mdns_peer)
                nursery.start_soon(self.dialer.run, host, nursery)
                self._run_inbox()
                self.ready.set()
                await self._stopping.wait()
                nursery.cancel_scope.cancel()
                if cfg.enable_mdns:
                    peerDiscovery.unregister_peer_discovered_handler(self._on_mdns_peer)
                # Leaving host.run() stops its tasks but leaves sockets to the garbage
                # collector; peers would not see us go. Close connections explicitly, after
                # the listeners: peers that see us go redial at once, and a connection
                # accepted while closing fails its upgrade loudly (py-libp2p's ADDCONN_FAIL).
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await _close_listeners(host)
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
        start_soon(self._nursery, fn, *args)

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
            return self._gossip_bytes + self.directs.max_backlog()
        return self.directs.backlog(peer)

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
                            self.directs.queue(peer, tx.data)
                    continue
                self._gossip.append((tx.topic, tx.data))
                self._gossip_bytes += len(tx.data)
                self._gossip_wake.set()
            elif tx.peer is not None and not self.shim.blocks(tx.peer):
                self.directs.queue(tx.peer, tx.data)
        while (event := self.endpoint.next_event()) is not None:
            if isinstance(event, Delivered):
                self._post(self.sink.delivered, event)
            elif isinstance(event, WindowOpen):
                self._retry_blocked(event.peer, event.stream)
            elif isinstance(event, Rejected):
                self._rejected_envelope(event)
                self._post(self.sink.protocol_event, event)
            elif isinstance(event, Gap | Unrecoverable):
                peer = event.origin if isinstance(event, Gap) else event.peer
                self._events_log.warning(peer, type(event).__name__, "%s", event)
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
        self._hello_seq += 1
        self.endpoint.subscribe(topic, self._now())
        self.peers.hello_changed()
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
        # py-libp2p has no subscription callback; its peer_topics map is one source of
        # subscribers (for peers that never said hello), our peers' hellos the other.
        assert self._pubsub is not None
        while True:
            now = self._now()
            changed = False
            for topic in self._topics:
                current = {p.to_base58() for p in self._pubsub.peer_topics.get(topic, ())}
                if current != self._gossip_subscribers.get(topic, set()):
                    self._gossip_subscribers[topic] = current
                    changed |= self._update_subscribers(topic, now)
            if changed:
                self._flush()
            await trio.sleep(self.config.subscriber_poll)

    def _update_subscribers(self, topic: str, now: float) -> bool:
        """Recompute `topic`'s subscribers from both sources; tell the endpoint what changed."""
        current = frozenset(
            self._gossip_subscribers.get(topic, set()) | self.peers.membership.subscribers(topic)
        )
        known = self._subscribers.get(topic, frozenset())
        if current == known:
            return False
        for peer in sorted(current - known):
            self.endpoint.add_subscriber(topic, peer, now)
        for peer in sorted(known - current):
            self.endpoint.remove_subscriber(topic, peer, now)
        self._subscribers[topic] = current
        return True

    # -- refused input -------------------------------------------------------------------

    def reject(self, peer: str, kind: str) -> None:
        """Input of `kind` from `peer` was refused: count it, log it (rate-limited), and cut
        the peer off if it keeps at it."""
        total = self.rejections.count(peer, kind)
        self._events_log.warning(
            peer, kind, "refused input from %s: %s (%d so far)", peer, kind, total
        )
        self.penalize(peer, kind)

    def penalize(self, peer: str, kind: str) -> None:
        """One more refusal of `peer`'s input (counted elsewhere): cut it off if it keeps
        at it."""
        if self.penalties.bad(peer, self._now()):
            self._cut_off(
                peer,
                f"{kind} and more: over {self.config.penalty.max_bad} refusals in {self.config.penalty.window:g} s",
            )

    def _rejected_envelope(self, event: Rejected) -> None:
        # The endpoint counted it in the peer's health already (that is where /metrics reads
        # it from); here it only counts towards cutting the peer off.
        self._events_log.warning(event.peer, event.reason, "%s", event)
        if event.reason.startswith(_NOT_HOSTILE):
            return
        if self.penalties.bad(event.peer, self._now()):
            self._cut_off(event.peer, f"{event.reason} and more")

    def _cut_off(self, peer: str, why: str) -> None:
        self.stats.peers_cut_off += 1
        log.warning("cutting off %s for %g s: %s", peer, self.config.penalty.ban, why)
        self._spawn(self._close_peer, peer)

    async def _close_peer(self, peer: str) -> None:
        assert self._host is not None
        with trio.move_on_after(2):
            await self._host.get_network().close_peer(ID.from_base58(peer))

    # -- peers -----------------------------------------------------------------------------

    def _peer_connected(self, peer: str, address: str | None) -> None:
        if self.penalties.banned(peer, self._now()):
            self._spawn(self._close_peer, peer)  # still cut off: it may not come back yet
            return
        first = peer not in self.connected
        self.connected[peer] = self.connected.get(peer) or address or "?"
        if first:
            self.endpoint.add_peer(peer, self._now())
            self.endpoint.health(peer).on_connected(self._now())
        self.peers.on_connected(peer, first)
        self._flush()

    def _peer_disconnected(self, peer: str) -> None:
        assert self._host is not None
        if self._host.get_network().get_connections(ID.from_base58(peer)):
            return  # another connection to the same peer is still up
        if self.connected.pop(peer, None) is None:
            return
        if self.peers.membership.hello_of(peer) is not None:
            # A member that was cut (hung, or its link broke) may come back: keep where it
            # listens among the addresses to dial (forgotten if it keeps failing).
            for addr in self._listen_addrs_of(peer):
                self.dialer.add(addr, "returning")
        self.dialer.on_disconnected(peer)
        self.directs.forget(peer)
        self.endpoint.remove_peer(peer, self._now())
        self.peers.on_disconnected(peer)
        self._flush()

    def _apply_membership(self, change: MembershipChange) -> None:
        """Act on what Membership decided about one peer."""
        now = self._now()
        for topic in change.subscribed | change.unsubscribed:
            self._update_subscribers(topic, now)
        if change.announce is not None:
            self._post(self.sink.connection, change.peer, change.announce)
        self._flush()

    def _own_hello(self) -> Hello:
        return Hello(
            role=self.config.role,
            topics=frozenset(self._topics),
            epoch=self.endpoint.epoch,
            seq=self._hello_seq,
        )

    def _liveness_input(self) -> tuple[dict[str, float | None], set[str]]:
        now = self._now()
        heard = {p: self.endpoint.health(p).last_seen for p in self.connected}
        # UNKNOWN: connected, but no heartbeat since (a peer that hangs right after it
        # connects is found by its silence too).
        quiet = (PeerState.DEAD, PeerState.UNKNOWN)
        dead = {p for p in heard if self.endpoint.health(p).state(now) in quiet}
        return heard, dead

    @property
    def planner(self) -> DialPlanner:
        """Where this engine dials, and when."""
        return self.dialer.planner

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        """Learn a peer address (thread-safe)."""
        self._submit(lambda: self.dialer.add(addr, source))

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        # Called on zeroconf's thread, for every engine of this process: hop to ours.
        for addr in info.addrs:
            self.add_peer_addr(f"{addr}/p2p/{info.peer_id.to_base58()}", "mdns")

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
            # First-hand: the peer's own hello said it only watches.
            row["observer"] = self.peers.membership.is_observer(snapshot.peer)
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


async def _close_listeners(host: IHost) -> None:
    network: Any = host.get_network()
    for listener in list(network.listeners.values()):
        try:
            await listener.close()
        except Exception as exc:
            log.debug("closing a listener: %r", exc)
    network.listeners.clear()


class _ConnectionWatch(INotifee):
    """Turns libp2p connection notifications into engine calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        # Counted from the connections' own stream sets, so the count cannot drift.
        peer = stream.muxed_conn.peer_id
        streams = sum(len(conn.get_streams()) for conn in network.get_connections(peer))
        if streams > self.engine.config.max_streams_per_peer:
            self.engine.reject(peer.to_base58(), "too many streams")
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
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
