"""The application side: exo's Router/TopicRouter interface over the reliable engine.

It runs under any anyio backend (asyncio for exo, trio alike). The libp2p engine runs on its
own thread with its own trio loop, or, asked for (`engine_loop="shared"`) by a trio
application, on the application's loop (`enginehost`); this module only moves items between
anyio channels and the engine. Backpressure is end to end: a receiver that is not read fills its channel, its
TopicRouter stops reporting consumption, the protocol stops granting credit, and the remote
publisher's `send` waits. Nothing is dropped on the way.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import attrs
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from p2p_reliable import Delivered, Gap, MessageTooLarge, Rejected, Unrecoverable

from .bridge import loop_poster
from .channels import DEFAULT_BUFFER, Receiver, Sender
from .config import EngineConfig
from .engine import Engine
from .enginehost import EngineLoop, hosted_engine, shares_loop
from .faults import FaultConfig
from .ratelog import RateLimitedLog
from .topic_router import DirectDelivery, DirectMessage, TopicRouter
from .topics import CONNECTION_MESSAGES, ConnectionMessage, PublishPolicy, TypedTopic

__all__ = ["DirectMessage", "Router", "RouterConfig", "TopicRouter"]

log = logging.getLogger("p2pr.router")

T = TypeVar("T")


@attrs.frozen
class RouterConfig:
    """Settings of a Router beyond exo's constructor arguments."""

    engine: EngineConfig = attrs.field(factory=EngineConfig)
    # Messages handed to the engine but not yet accepted into a protocol window; `send`
    # waits beyond this (the window being full means the receivers are behind).
    outbound_slots: int = 1024
    # Where the engine runs (`router.enginehost`): on a thread of its own, or "shared": on the
    # application's loop when that is trio (fewer thread crossings; see there for the trade).
    engine_loop: EngineLoop = "thread"
    receiver_buffer: float = DEFAULT_BUFFER  # items per receiver; math.inf as exo's


class Router:
    """exo's Router, reliable: typed topics over gossipsub, point-to-point over streams."""

    @classmethod
    def create(
        cls,
        identity: KeyPair | None = None,
        bootstrap_peers: Sequence[str] = (),
        listen_port: int = 0,
        *,
        config: RouterConfig | None = None,
    ) -> Router:
        """A router for `identity` (a libp2p key pair; a new one if None)."""
        config = config or RouterConfig()
        engine = attrs.evolve(
            config.engine,
            bootstrap=tuple(config.engine.bootstrap) + tuple(bootstrap_peers),
            listen_port=listen_port or config.engine.listen_port,
        )
        return cls(identity or create_new_key_pair(), attrs.evolve(config, engine=engine))

    def __init__(self, key_pair: KeyPair, config: RouterConfig) -> None:
        self.key_pair = key_pair
        self.config = config
        # Computed once: deriving it costs a key serialization and a base58 encoding.
        self._node_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self.topic_routers: dict[str, TopicRouter[Any]] = {}
        self._direct: dict[str, TopicRouter[DirectMessage]] = {}
        self.engine: Engine | None = None
        self.bad_payloads: Counter[str] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()
        self._log = RateLimitedLog(log)
        self.protocol_events: deque[Gap | Unrecoverable | Rejected] = deque(maxlen=1000)
        self.connected: set[str] = set()
        self._tg: TaskGroup | None = None
        self._starts: MemoryObjectSendStream[TopicRouter[Any]] | None = None
        self._slots: anyio.Semaphore | None = None
        # Events are made on the application's loop (the router may be built outside one).
        self._ready: anyio.Event | None = None
        self._post: Callable[..., None] | None = None
        # Set (and replaced) whenever subscribers change or local sending makes progress.
        self._subscribers_event: anyio.Event | None = None
        self._local_event: anyio.Event | None = None
        self._protocol_event: anyio.Event | None = None

    @property
    def node_id(self) -> str:
        """This node's libp2p peer id (12D3KooW…)."""
        return self._node_id

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) others can bootstrap from, once running."""
        return list(self.engine.addrs) if self.engine else []

    def subscribers(self, topic: str) -> set[str]:
        """Remote peers currently subscribed to `topic`, as gossipsub reports them."""
        return set(self.engine.subscribers(topic)) if self.engine else set()

    async def wait_for_subscribers(self, topic: str, count: int) -> None:
        """Wait until at least `count` remote peers subscribe to `topic`."""
        while len(self.subscribers(topic)) < count:
            await self._subscribers_changed_event().wait()

    async def wait_for_subscriber(self, topic: str, peer: str) -> None:
        """Wait until `peer` subscribes to `topic`."""
        while peer not in self.subscribers(topic):
            await self._subscribers_changed_event().wait()

    async def drain(self) -> None:
        """Wait until everything sent so far is acknowledged by its receivers (or given up)."""
        engine = self._running_engine()
        post = self._post
        assert post is not None
        while True:
            while not self._local_idle():
                await self._local_progress_event().wait()
            idle = anyio.Event()
            engine.submit_when_idle(functools.partial(post, idle.set))
            await idle.wait()
            if self._local_idle():
                return

    def _local_idle(self) -> bool:
        """Nothing sent here waits to enter the engine."""
        assert self._slots is not None
        queued = self.config.outbound_slots - int(self._slots.value)
        return not queued and not any(r.local_busy() for r in self.topic_routers.values())

    def _subscribers_changed_event(self) -> anyio.Event:
        if self._subscribers_event is None:
            self._subscribers_event = anyio.Event()
        return self._subscribers_event

    def _local_progress_event(self) -> anyio.Event:
        if self._local_event is None:
            self._local_event = anyio.Event()
        return self._local_event

    async def query(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` on the engine's loop (where protocol state may be read); its result.

        Raises TimeoutError if the engine has not answered within `timeout` seconds.
        """
        engine = self._running_engine()
        post = self._post
        assert post is not None
        answered = anyio.Event()
        future = engine.query(fn)
        # The engine's thread wakes this loop once: no polling while it works.
        future.add_done_callback(lambda _: post(answered.set))
        with anyio.fail_after(timeout):
            await answered.wait()
        result: T = future.result()
        return result

    async def health(self) -> list[dict[str, Any]]:
        """This node's view of every peer it knows: state, phi, RTT, loss, counters."""
        engine = self._running_engine()
        return await self.query(engine.report.health_view)

    async def rejections(self) -> dict[tuple[str, str], int]:
        """Input refused above the protocol, per (peer, kind): payloads of the wrong type,
        bad hellos, oversized or malformed direct-stream frames, exhausted limits. (The
        protocol's own rejections are in each peer's health row.)"""
        engine = self._running_engine()
        counts: dict[tuple[str, str], int] = await self.query(engine.refusals.counts.copy)
        for key, count in self.refusals.items():
            counts[key] = counts.get(key, 0) + count
        return counts

    async def counters(self, timeout: float | None = None) -> dict[str, Any]:
        """The protocol's counters (`protocol`), the fault shim's (`shim`) and every peer's
        health row (`peers`), JSON-ready."""
        engine = self._running_engine()
        return await self.query(engine.report.counters, timeout)

    def set_faults(self, faults: FaultConfig | None, partition: Collection[str] = ()) -> None:
        """Fault injection (chaos runs): the fault shim's settings from now on (None: none),
        and the peers every frame to and from which is cut (empty: healed)."""
        self._running_engine().submit_faults(faults, partition)

    async def health_states(self) -> dict[str, str]:
        """Every known peer's state name (ALIVE, SUSPECT, DEAD, UNKNOWN): a cheap poll."""
        engine = self._running_engine()
        return await self.query(engine.report.health_states)

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        """Dial a peer at this multiaddr; configured sources are redialed for ever, others
        ('mdns', 'exchange') are forgotten after repeated failures."""
        self._running_engine().add_peer_addr(addr, source)

    async def wait_ready(self) -> None:
        """Wait until run() has started the host (listen_addrs is then filled)."""
        if self._ready is None:
            self._ready = anyio.Event()
        await self._ready.wait()

    # -- exo's interface -------------------------------------------------------------------

    async def register_topic(self, topic: TypedTopic[T]) -> None:
        """Add a topic; subscribes at once if the router is running."""
        router = TopicRouter[T](topic, self, self.config.receiver_buffer)
        self.topic_routers[topic.topic] = router
        if self._tg is not None:
            self._tg.start_soon(router.run)
            self._subscribe(topic)

    def sender(self, topic: TypedTopic[T]) -> Sender[T]:
        """A sender for `topic` (registered before)."""
        return self._topic_router(topic).new_sender()

    def receiver(self, topic: TypedTopic[T]) -> Receiver[T]:
        """A fresh receiver of every item on `topic` (registered before)."""
        return self._topic_router(topic).new_receiver()

    async def run(self) -> None:
        """Run the node until cancelled (or shutdown())."""
        post = self._post = loop_poster()
        self._slots = anyio.Semaphore(self.config.outbound_slots)
        if self._ready is None:
            self._ready = anyio.Event()
        engine = Engine(self.key_pair, self.config.engine, sink=self, post=post)
        self.engine = engine
        try:
            async with hosted_engine(engine, shares_loop(self.config.engine_loop)):
                # Unbounded in itself; there are at most as many direct streams as the
                # protocol keeps state for (ProtocolConfig.max_inbound_streams) plus the
                # application's own.
                starts_send, starts_recv = anyio.create_memory_object_stream[TopicRouter[Any]](
                    math.inf
                )
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    self._starts = starts_send
                    tg.start_soon(self._start_routers, starts_recv)
                    for router in [*self.topic_routers.values(), *self._direct.values()]:
                        tg.start_soon(router.run)
                    for router in self.topic_routers.values():
                        self._subscribe(router.topic)
                    self._ready.set()
                    await anyio.sleep_forever()
        finally:
            self._tg = None
            self._starts = None
            for router in [*self.topic_routers.values(), *self._direct.values()]:
                await router.shutdown()

    async def shutdown(self) -> None:
        """Stop run()."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -- point to point --------------------------------------------------------------------

    async def send_to(self, peer: str, stream: str, payload: bytes) -> None:
        """Send `payload` to `peer` alone, reliably, on a direct stream."""
        engine = self._running_engine()
        self._check_size(payload)
        assert self._slots is not None
        await self._slots.acquire()
        engine.submit_send(peer, stream, payload)

    def direct_receiver(self, stream: str) -> Receiver[DirectMessage]:
        """A receiver of every point-to-point message sent to this node on `stream`.

        Messages that arrive before any receiver exists wait (and hold their sender back).
        """
        return self._direct_router(stream).new_receiver()

    def _direct_router(self, stream: str) -> TopicRouter[DirectMessage]:
        router = self._direct.get(stream)
        if router is None:
            topic = TypedTopic(stream, PublishPolicy.Never, DirectMessage)
            router = TopicRouter(topic, self, self.config.receiver_buffer, hold=True)
            self._direct[stream] = router
            if self._starts is not None:
                # Through the starter task: this may be called from a plain callback (the
                # engine's delivery), where asyncio has no current task to spawn from.
                self._starts.send_nowait(router)
        return router

    async def _start_routers(self, starts: MemoryObjectReceiveStream[TopicRouter[Any]]) -> None:
        assert self._tg is not None
        async for router in starts:
            self._tg.start_soon(router.run)

    # -- AppSink: called by the engine, on this loop ---------------------------------------

    def delivered(self, event: Delivered) -> None:
        """A message arrived in order, verified."""
        if event.direct:
            router = self._direct_router(event.stream)
            router.inbox.send.send_nowait(
                DirectDelivery(event, DirectMessage(event.origin, event.stream, event.payload))
            )
            return
        topic_router = self.topic_routers.get(event.stream)
        if topic_router is None:
            self.bad_payload(event.origin, f"message on unregistered topic {event.stream!r}")
            self.consumed(event.origin, event.stream, event.end, False)
            return
        topic_router.inbox.send.send_nowait(event)

    def accepted(self, count: int) -> None:
        """The engine took `count` messages into protocol windows."""
        assert self._slots is not None
        for _ in range(count):
            self._slots.release()
        self.local_item_done()

    def connection(self, peer: str, connected: bool) -> None:
        """A connection to `peer` opened or closed."""
        (self.connected.add if connected else self.connected.discard)(peer)
        router = self.topic_routers.get(CONNECTION_MESSAGES.topic)
        if router is not None:
            # Through the topic's inbox, so connection events keep the engine's order.
            router.inbox.send.send_nowait(self.connection_message(peer, connected))

    def connection_message(self, peer: str, connected: bool) -> Any:
        """The item a connection event puts on `connection_messages` (exo's adapter
        overrides this to give exo's own pydantic ConnectionMessage)."""
        return ConnectionMessage(node_id=peer, connected=connected)

    def protocol_event(self, event: Gap | Unrecoverable | Rejected) -> None:
        """A loss verdict or a rejected input; kept for inspection, already logged."""
        self.protocol_events.append(event)
        waiting, self._protocol_event = self._protocol_event, None
        if waiting is not None:
            waiting.set()

    async def wait_protocol_event(self) -> None:
        """Wait for the next loss verdict or rejected input (see `protocol_events`)."""
        if self._protocol_event is None:
            self._protocol_event = anyio.Event()
        await self._protocol_event.wait()

    def subscribers_changed(self, topic: str) -> None:
        """The remote subscribers of `topic` changed: wake whoever waits for them."""
        event, self._subscribers_event = self._subscribers_event, None
        if event is not None:
            event.set()

    def local_item_done(self) -> None:
        """Local sending made progress: wake `drain`."""
        event, self._local_event = self._local_event, None
        if event is not None:
            event.set()

    # -- internals -------------------------------------------------------------------------

    def _topic_router(self, topic: TypedTopic[T]) -> TopicRouter[T]:
        router = self.topic_routers.get(topic.topic)
        if router is None:
            raise KeyError(f"topic {topic.topic!r} is not registered")
        if router.topic != topic:
            raise ValueError(f"topic {topic.topic!r} was registered as {router.topic}")
        return router

    def _running_engine(self) -> Engine:
        if self.engine is None or self._tg is None:
            raise RuntimeError("the router is not running")
        return self.engine

    def _subscribe(self, topic: TypedTopic[Any]) -> None:
        if topic.publish_policy is not PublishPolicy.Never and self.engine is not None:
            self.engine.submit_subscribe(topic.topic)

    def _check_size(self, payload: bytes) -> None:
        limit = self.config.engine.protocol.max_message_size
        if len(payload) > limit:
            raise MessageTooLarge(f"{len(payload)} bytes exceeds max_message_size {limit}")

    async def publish_encoded(self, topic: str, data: bytes) -> None:
        """Publish `data` (an item of `topic`, encoded) to the network."""
        engine = self._running_engine()
        self._check_size(data)
        assert self._slots is not None
        await self._slots.acquire()
        engine.submit_publish(topic, data)

    def consumed(self, origin: str, stream: str, upto: int, direct: bool) -> None:
        """The application took `origin`'s messages on `stream` below `upto`: grant credit."""
        if self.engine is not None:
            self.engine.submit_consumed(origin, stream, upto, direct)

    def refused(self, peer: str, kind: str, detail: str) -> None:
        """The application refused input from `peer` (a message that is not what its stream
        carries): count it per (peer, kind), log it rate-limited, and let it count towards
        cutting the peer off, as refused envelopes do."""
        self.refusals[(peer, kind)] += 1
        self._log.warning(peer, kind, "refused a message from %s: %s: %s", peer, kind, detail)
        if self.engine is not None:
            engine = self.engine
            engine.submit_call(lambda: engine.refusals.penalize(peer, kind))

    def bad_payload(self, peer: str, reason: str) -> None:
        """`peer` delivered an item that is not what its topic carries."""
        self.bad_payloads[peer] += 1
        self.refused(peer, "bad payload", reason)


if TYPE_CHECKING:
    from .interface import RouterLike

    _provides: type[RouterLike] = Router  # checked by mypy: it is a RouterLike
