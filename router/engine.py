"""The libp2p side: one trio loop that owns a py-libp2p host and drives the protocol Endpoint.

Everything here runs on the engine's trio loop: one on a thread of its own, or the
application's own when it asked to share it (`enginehost`). The application talks to it through
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
from collections.abc import Callable, Collection
from typing import Any, Protocol

import attrs
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p_reliable import (
    Delivered,
    Endpoint,
    Gap,
    Rejected,
    Unrecoverable,
    WindowOpen,
)

from .bridge import LoopBridge
from .config import EngineConfig
from .connwatch import ConnectionWatch, close_listeners
from .dialer import Dialer
from .dialplan import DialPlanner
from .directs import DirectTransport, start_soon
from .faults import FaultConfig, FaultShim
from .gossip import GossipLink
from .host import build_host, build_pubsub, listen_addrs
from .membership import Hello, MembershipChange
from .outbox import Outbox
from .peer_rows import PeerReport
from .peerwatch import PeerWatch
from .ratelog import RateLimitedLog
from .refusals import Refusals

log = logging.getLogger("p2pr.engine")


class AppSink(Protocol):
    """What the application hears; the engine calls these on the application's loop."""

    def delivered(self, event: Delivered) -> None: ...
    def accepted(self, count: int) -> None: ...
    def connection(self, peer: str, connected: bool) -> None: ...
    def protocol_event(self, event: Gap | Unrecoverable | Rejected) -> None: ...
    def subscribers_changed(self, topic: str) -> None: ...


@attrs.define
class EngineStats:
    """Transport-level counters (the protocol's own are in Endpoint.stats, the direct
    streams' in Engine.directs.stats, gossipsub's in Engine.gossip)."""

    frames_received: int = 0
    peers_cut_off: int = 0


class Engine:
    """A libp2p host plus the reliability Endpoint, in a trio loop: the application's own, or
    one on a thread of its own (`router.enginehost`)."""

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
            config=config.protocol_config(),
            cluster_secret=config.cluster_secret,
        )
        self.connected: dict[str, str] = {}  # peer -> the address of its connection
        self.shim = FaultShim(config.faults)
        self.stats = EngineStats()
        self.refusals = Refusals(config.penalty, self.now, self._cut_off)
        self._events_log = RateLimitedLog(log)
        self.addrs: list[str] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._bridge = LoopBridge(after=self._flush)
        self.outbox = Outbox(
            self.endpoint,
            config.transport_backlog,
            self._backlog,
            lambda: self._post(self.sink.accepted, 1),
            self.now,
        )
        self._idle_waiters: list[Callable[[], None]] = []
        self._timer_changed = trio.Event()
        self._armed_at = math.inf  # the deadline the timer loop sleeps until
        self._stopping = trio.Event()
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._nursery: trio.Nursery | None = None
        self._build_network_parts(config)

    def _build_network_parts(self, config: EngineConfig) -> None:
        """Dialing, hello and liveness, direct streams, gossipsub, and what they report."""
        self.dialer = Dialer(self.node_id, config.redial_interval, lambda: self.connected)
        self.peers = PeerWatch(
            config.liveness,
            self._own_hello,
            self._apply_membership,
            lambda: self.report.liveness_input(),
            reject=lambda peer, kind: self.refusals.reject(peer, kind),
        )
        self.report = PeerReport(
            self.endpoint,
            self.connected,
            self.peers.membership,
            self.shim,
            lambda: self._host,
            self.now,
        )
        self.directs = DirectTransport(
            config.direct,
            config.protocol.max_frame_bytes + 4096,
            receive=self._receive,
            drained=self._transport_drained,
            reject=self.refusals.reject,
        )
        self._hello_seq = 0
        self.gossip = GossipLink(
            queue_high_water=config.gossip_queue_high_water,
            poll_interval=config.subscriber_poll,
            receive=self._receive,
            drained=lambda: self._transport_drained(None),
            members=self.peers.membership.subscribers,
            changed=self._subscribers_changed,
        )

    # -- thread-safe entry points (called from the application's thread) -------------------

    def submit_publish(self, topic: str, data: bytes) -> None:
        """Queue a broadcast on `topic`."""
        self._bridge.submit(lambda: self.outbox.offer(None, topic, data))

    def submit_send(self, peer: str, stream: str, data: bytes) -> None:
        """Queue a point-to-point message."""
        self._bridge.submit(lambda: self.outbox.offer(peer, stream, data))

    def submit_consumed(self, origin: str, stream: str, upto: int, direct: bool) -> None:
        """The application took `origin`'s messages below `upto`: grant more credit."""
        self._bridge.submit(
            lambda: self.endpoint.consumed(origin, stream, upto, self.now(), direct)
        )

    def submit_subscribe(self, topic: str) -> None:
        """Subscribe to `topic` on the network."""
        self._bridge.submit(lambda: self._spawn(self._subscribe, topic))

    def submit_call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine's loop (thread-safe; its result is not returned)."""
        self._bridge.submit(fn)

    def submit_faults(self, config: FaultConfig | None, partition: Collection[str]) -> None:
        """Fault injection (chaos runs): the shim's settings from now on (None: no faults),
        and the peers every frame to and from which is cut (empty: healed)."""

        def apply() -> None:
            self.shim.config = config or FaultConfig()
            self.shim.rng = random.Random(self.shim.config.seed)
            self.shim.partitioned = set(partition)

        self._bridge.submit(apply)

    def submit_when_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the engine's loop once nothing is queued, blocked or
        unacknowledged (see `idle`)."""

        def register() -> None:
            self._idle_waiters.append(callback)

        self._bridge.submit(register)

    def subscribers(self, topic: str) -> frozenset[str]:
        """Peers subscribed to `topic` (safe from any thread)."""
        return self.gossip.subscribers(topic)

    def query(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the engine's loop (where its state may be read safely)."""
        future: concurrent.futures.Future[Any] = self._bridge.query(fn)
        return future

    def idle(self) -> bool:
        """Nothing queued, blocked or unacknowledged (call on the engine's loop)."""
        return (
            self.gossip.idle()
            and self.outbox.idle()
            and self.directs.idle()
            and self.endpoint.unacked() == 0
        )

    def stop(self) -> None:
        """Ask the engine to shut down; returns at once."""
        self._bridge.submit(self._stopping.set)

    # -- the trio loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Thread body: run the host until stop()."""
        try:
            trio.run(self._main, self.ready.set)
        except BaseException as exc:  # reported to the application, which owns the thread
            self.error = exc
            log.exception("engine stopped with an error")
        finally:
            self.ready.set()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host on the calling trio loop until stop(); started once it is ready."""
        await self._main(lambda: task_status.started())

    async def _main(self, started: Callable[[], None]) -> None:
        cfg = self.config
        self._bridge.attach()
        addrs = listen_addrs(cfg.listen_host, cfg.listen_port)
        host = build_host(self.key_pair, addrs, cfg.psk, cfg.enable_mdns)
        pubsub, gossipsub = build_pubsub(host, self._app_score, self.refusals.reject)
        self._host, self._pubsub = host, pubsub
        host.get_network().register_notifee(
            ConnectionWatch(
                connected=self._peer_connected,
                disconnected=self._peer_disconnected,
                reject=self.refusals.reject,
                max_streams_per_peer=cfg.max_streams_per_peer,
            )
        )
        async with host.run(addrs), trio.open_nursery() as nursery:
            self._nursery = nursery
            self.peers.start(host, nursery)
            self.directs.start(host, nursery)
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                self.addrs = [str(a) for a in host.get_addrs()]
                nursery.start_soon(self._timer_loop)
                self.gossip.start(pubsub, self.peer_id, nursery)
                for source, configured in (
                    ("bootstrap", cfg.bootstrap),
                    ("static", cfg.static_peers),
                ):
                    for addr in configured:
                        self.dialer.add(addr, source)
                if cfg.enable_mdns:
                    peerDiscovery.register_peer_discovered_handler(self._on_mdns_peer)
                nursery.start_soon(self.dialer.run, host, nursery)
                self._bridge.run_pending()
                started()
                await self._stopping.wait()
                nursery.cancel_scope.cancel()
                if cfg.enable_mdns:
                    peerDiscovery.unregister_peer_discovered_handler(self._on_mdns_peer)
                # Leaving host.run() stops its tasks but leaves sockets to the garbage
                # collector; peers would not see us go. Close connections explicitly, after
                # the listeners: peers that see us go redial at once, and a connection
                # accepted while closing fails its upgrade loudly (py-libp2p's ADDCONN_FAIL).
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await close_listeners(host)
                    await host.close()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        start_soon(self._nursery, fn, *args)

    @staticmethod
    def now() -> float:
        """The engine's clock (trio's; call on the engine's loop)."""
        return trio.current_time()

    # -- protocol I/O ----------------------------------------------------------------------

    def _backlog(self, peer: str | None) -> int:
        if peer is None:
            # Topic frames may also travel on direct streams (bulk unicast).
            return self.gossip.backlog + self.directs.max_backlog()
        return self.directs.backlog(peer)

    def _transport_drained(self, peer: str | None) -> None:
        """libp2p took frames: admit messages that waited for transport room."""
        if self.outbox.drained(peer):
            self._flush()
        else:
            self._wake_idle_waiters()

    def _flush(self) -> None:
        """Hand what the Endpoint produced to libp2p and its events to the application."""
        now = self.now()
        for tx in self.endpoint.datagrams_to_send(now):
            if tx.topic is not None:
                bulk = self._bulk_targets(tx.topic, len(tx.data))
                if bulk:
                    for peer in bulk:
                        if not self.shim.blocks(peer):
                            self.directs.queue(peer, tx.data)
                    continue
                self.gossip.queue(tx.topic, tx.data)
            elif tx.peer is not None and not self.shim.blocks(tx.peer):
                self.directs.queue(tx.peer, tx.data)
        while (event := self.endpoint.next_event()) is not None:
            if isinstance(event, Delivered):
                self._post(self.sink.delivered, event)
            elif isinstance(event, WindowOpen):
                self.outbox.retry(event.peer, event.stream)
            elif isinstance(event, Rejected):
                self.refusals.rejected_envelope(event)
                self._post(self.sink.protocol_event, event)
            elif isinstance(event, Gap | Unrecoverable):
                peer = event.origin if isinstance(event, Gap) else event.peer
                self._events_log.warning(peer, type(event).__name__, "%s", event)
                self._post(self.sink.protocol_event, event)
        self._rearm_timer()
        self._wake_idle_waiters()

    def _wake_idle_waiters(self) -> None:
        if self._idle_waiters and self.idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for callback in waiters:
                callback()

    def _bulk_targets(self, topic: str, size: int) -> frozenset[str]:
        threshold = self.config.bulk_unicast_bytes
        if threshold is None or size < threshold:
            return frozenset()
        subscribers = self.subscribers(topic)
        if len(subscribers) > self.config.bulk_max_subscribers:
            return frozenset()
        return subscribers

    def _receive(self, data: bytes, peer: str, arrived: float | None = None) -> None:
        """A frame from `peer`; `arrived`: when the transport read it, if it waited since."""
        self.stats.frames_received += 1
        for delay, frame in self.shim.inbound(data, peer):
            if delay > 0:  # a delay the shim adds stands for the network's: no arrival stamp
                self._spawn(self._receive_later, delay, frame, peer)
            else:
                self.endpoint.receive(self.shim.damage(frame, peer), peer, self.now(), arrived)
        self._flush()

    async def _receive_later(self, delay: float, frame: bytes, peer: str) -> None:
        await trio.sleep(delay)
        self.endpoint.receive(self.shim.damage(frame, peer), peer, self.now())
        self._flush()

    def _rearm_timer(self) -> None:
        # Wake the timer loop only for a deadline earlier than the one it sleeps until: a
        # later one is found when it wakes. Waking it on every flush cost a task switch and a
        # cancel scope per message.
        deadline = self.endpoint.get_timer()
        if deadline is not None and deadline < self._armed_at:
            self._timer_changed.set()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.endpoint.get_timer()
            self._armed_at = deadline if deadline is not None else math.inf
            self._timer_changed = trio.Event()
            with trio.move_on_at(self._armed_at):
                await self._timer_changed.wait()
            now = self.now()
            deadline = self.endpoint.get_timer()
            if deadline is not None and now >= deadline:
                self.endpoint.handle_timer(now)
                self._flush()

    # -- gossipsub -------------------------------------------------------------------------

    async def _subscribe(self, topic: str) -> None:
        if topic in self.gossip.topics:
            return
        self.gossip.topics.add(topic)
        self._hello_seq += 1
        self.endpoint.subscribe(topic, self.now())
        self.peers.hello_changed()
        await self.gossip.subscribe(topic)

    def _subscribers_changed(
        self, topic: str, added: frozenset[str], removed: frozenset[str]
    ) -> None:
        now = self.now()
        for peer in sorted(added):
            self.endpoint.add_subscriber(topic, peer, now)
        for peer in sorted(removed):
            self.endpoint.remove_subscriber(topic, peer, now)
        self._post(self.sink.subscribers_changed, topic)
        self._flush()

    # -- refused input -------------------------------------------------------------------

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
        if self.refusals.banned(peer):
            self._spawn(self._close_peer, peer)  # still cut off: it may not come back yet
            return
        first = peer not in self.connected
        self.connected[peer] = self.connected.get(peer) or address or "?"
        if first:
            self.endpoint.add_peer(peer, self.now())
            self.endpoint.health(peer).on_connected(self.now())
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
            for addr in self.report.listen_addrs_of(peer):
                self.dialer.add(addr, "returning")
        self.dialer.on_disconnected(peer)
        self.directs.forget(peer)
        self.endpoint.remove_peer(peer, self.now())
        self.peers.on_disconnected(peer)
        self._flush()

    def _apply_membership(self, change: MembershipChange) -> None:
        """Act on what Membership decided about one peer."""
        for topic in change.subscribed | change.unsubscribed:
            self.gossip.update(topic)
        if change.announce is not None:
            self._post(self.sink.connection, change.peer, change.announce)
        self._flush()

    def _own_hello(self) -> Hello:
        return Hello(
            role=self.config.role,
            topics=frozenset(self.gossip.topics),
            epoch=self.endpoint.epoch,
            seq=self._hello_seq,
        )

    @property
    def planner(self) -> DialPlanner:
        """Where this engine dials, and when."""
        return self.dialer.planner

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        """Learn a peer address (thread-safe)."""
        self._bridge.submit(lambda: self.dialer.add(addr, source))

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        # Called on zeroconf's thread, for every engine of this process: hop to ours.
        for addr in info.addrs:
            self.add_peer_addr(f"{addr}/p2p/{info.peer_id.to_base58()}", "mdns")

    def _app_score(self, peer: ID) -> float:
        return self.endpoint.health(peer.to_base58()).score(self.now())
