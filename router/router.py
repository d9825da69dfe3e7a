"""The application side: exo's Router/TopicRouter interface over the reliable engine.

It runs under any anyio backend (asyncio for exo, trio alike). The libp2p engine lives on its
own thread with its own trio loop; this module only moves items between anyio channels and
that thread. Backpressure is end to end: a receiver that is not read fills its channel, its
TopicRouter stops reporting consumption, the protocol stops granting credit, and the remote
publisher's `send` waits. Nothing is dropped on the way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import attrs
import sniffio
import trio
from anyio import BrokenResourceError, ClosedResourceError
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2p_reliable import Delivered, Gap, MessageTooLarge, Rejected, Unrecoverable

from .channels import DEFAULT_BUFFER, Receiver, Sender, channel
from .engine import Engine, EngineConfig
from .ratelog import RateLimitedLog
from .topics import (
    CONNECTION_MESSAGES,
    ConnectionMessage,
    PublishPolicy,
    TopicDecodeError,
    TypedTopic,
)

log = logging.getLogger("p2pr.router")

T = TypeVar("T")

# How often a TopicRouter reports consumption back to the engine at the latest (items).
_CONSUMED_BATCH = 32


@attrs.frozen
class RouterConfig:
    """Settings of a Router beyond exo's constructor arguments."""

    engine: EngineConfig = attrs.field(factory=EngineConfig)
    # Messages handed to the engine but not yet accepted into a protocol window; `send`
    # waits beyond this (the window being full means the receivers are behind).
    outbound_slots: int = 1024
    receiver_buffer: float = DEFAULT_BUFFER  # items per receiver; math.inf as exo's


@attrs.frozen
class DirectMessage:
    """A point-to-point message received from `peer` on `stream`."""

    peer: str
    stream: str
    payload: bytes


class _Inbox:
    """Items for a TopicRouter from the network side (Delivered) or injected locally.

    Unbounded as a channel, but bounded in effect: the protocol grants a publisher at most
    `receive_window` sequence numbers beyond what this side has consumed.
    """

    def __init__(self) -> None:
        send: MemoryObjectSendStream[Delivered | Any]
        recv: MemoryObjectReceiveStream[Delivered | Any]
        send, recv = anyio.create_memory_object_stream(math.inf)
        self.send, self.recv = send, recv


class TopicRouter(Generic[T]):
    """One topic: local senders in, local receivers and the network out, by policy."""

    def __init__(
        self, topic: TypedTopic[T], router: Router, buffer: float, *, hold: bool = False
    ) -> None:
        self.topic = topic
        self.senders: set[Sender[T]] = set()
        self._buffer = buffer
        self._send, self.receiver = channel[T](buffer)
        self._router = router
        self._inbox = _Inbox()
        # hold: network items wait for a receiver instead of going to nobody (direct
        # streams: a reply may arrive before its reader exists).
        self._hold = hold
        self._receiver_added: anyio.Event | None = None
        self._working = False  # an item is between the local channel and the network

    async def run(self) -> None:
        """Move items until shut down."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._local_loop)
            tg.start_soon(self._network_loop)

    async def _local_loop(self) -> None:
        policy = self.topic.publish_policy
        with self.receiver as items:
            async for item in items:
                self._working = True
                await self._route_local(item, policy)
                self._working = False

    async def _route_local(self, item: T, policy: PublishPolicy) -> None:
        no_local = not self.senders
        if policy is PublishPolicy.Always or (policy is PublishPolicy.Minimal and no_local):
            await self._send_out(item)
        if policy is not PublishPolicy.Minimal or not no_local:
            await self.publish(item)

    async def _network_loop(self) -> None:
        pending: dict[tuple[str, bool], int] = {}
        count = 0
        async for item in self._inbox.recv:
            while self._hold and not self.senders:
                self._receiver_added = anyio.Event()
                await self._receiver_added.wait()
            if isinstance(item, Delivered):
                try:
                    value = self.topic.deserialize(item.payload)
                    self.topic.check_origin(value, item.origin)
                except TopicDecodeError as exc:
                    self._router._bad_payload(item.origin, str(exc))
                else:
                    await self.publish(value)
                pending[(item.origin, False)] = item.end
                count += 1
            elif isinstance(item, _DirectDelivery):
                await self.publish(item.message)  # type: ignore[arg-type]
                pending[(item.event.origin, True)] = item.event.end
                count += 1
            else:
                await self.publish(item)
            idle = not self._inbox.recv.statistics().current_buffer_used
            if pending and (count >= _CONSUMED_BATCH or idle):
                for (origin, direct), end in pending.items():
                    self._router._consumed(origin, self.topic.topic, end, direct)
                pending.clear()
                count = 0

    async def publish(self, item: T) -> None:
        """Give `item` to every local receiver (including the sender's own, as in exo)."""
        for sender in list(self.senders):
            try:
                await sender.send(item)
            except (ClosedResourceError, BrokenResourceError):
                self.senders.discard(sender)

    async def publish_bytes(self, data: bytes) -> None:
        """Give the item encoded in `data` to every local receiver."""
        await self.publish(self.topic.deserialize(data))

    def _local_busy(self) -> bool:
        return self._working or bool(self.receiver.statistics().current_buffer_used)

    def new_sender(self) -> Sender[T]:
        """A sender whose items this router distributes."""
        return self._send.clone()

    def new_receiver(self) -> Receiver[T]:
        """A fresh receiver of every item on this topic."""
        send, recv = channel[T](self._buffer)
        self.senders.add(send)
        if self._receiver_added is not None:
            self._receiver_added.set()
        return recv

    async def shutdown(self) -> None:
        """Close every channel of this topic."""
        for sender in self.senders:
            sender.close()
        self._send.close()
        self.receiver.close()
        self._inbox.send.close()

    async def _send_out(self, item: T) -> None:
        data = self.topic.serialize(item)
        try:
            await self._router._publish_bytes(self.topic.topic, data)
        except MessageTooLarge as exc:
            log.error("topic %s: item not sent: %s", self.topic.topic, exc)


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
        self._ready: anyio.Event | None = None
        self._post: Callable[..., None] | None = None

    @property
    def node_id(self) -> str:
        """This node's libp2p peer id (12D3KooW…)."""
        from libp2p.peer.id import ID

        return ID.from_pubkey(self.key_pair.public_key).to_base58()

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
            await anyio.sleep(0.02)

    async def drain(self) -> None:
        """Wait until everything sent so far is acknowledged by its receivers (or given up)."""
        engine = self._running_engine()
        assert self._slots is not None
        while True:
            queued = self.config.outbound_slots - int(self._slots.value)
            busy = any(r._local_busy() for r in self.topic_routers.values())
            if not queued and not busy and await self.query(engine.idle):
                return
            await anyio.sleep(0.01)

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
        return await self.query(engine.health_view)

    async def rejections(self) -> dict[tuple[str, str], int]:
        """Input refused above the protocol, per (peer, kind): payloads of the wrong type,
        bad hellos, oversized or malformed direct-stream frames, exhausted limits. (The
        protocol's own rejections are in each peer's health row.)"""
        engine = self._running_engine()
        counts = await self.query(engine.rejections.copy)
        for key, count in self.refusals.items():
            counts[key] = counts.get(key, 0) + count
        return counts

    async def health_states(self) -> dict[str, str]:
        """Every known peer's state name (ALIVE, SUSPECT, DEAD, UNKNOWN): a cheap poll."""
        engine = self._running_engine()
        return await self.query(engine.health_states)

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        """Dial a peer at this multiaddr; configured sources are redialed for ever, others
        ('mdns', 'exchange') are forgotten after repeated failures."""
        self._running_engine().add_peer_addr(addr, source)

    async def wait_ready(self) -> None:
        """Wait until run() has started the host (listen_addrs is then filled)."""
        while self._ready is None:
            await anyio.sleep(0.01)
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
        post = self._post = _loop_poster()
        self._slots = anyio.Semaphore(self.config.outbound_slots)
        self._ready = anyio.Event()
        engine = Engine(self.key_pair, self.config.engine, sink=self, post=post)
        thread = threading.Thread(target=engine.run, name="p2pr-engine", daemon=True)
        self.engine = engine
        thread.start()
        try:
            await anyio.to_thread.run_sync(engine.ready.wait, abandon_on_cancel=True)
            if engine.error is not None:
                raise RuntimeError(f"libp2p engine failed to start: {engine.error}")
            # Unbounded in itself; there are at most as many direct streams as the protocol
            # keeps state for (ProtocolConfig.max_inbound_streams) plus the application's own.
            starts_send, starts_recv = anyio.create_memory_object_stream[TopicRouter[Any]](math.inf)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._starts = starts_send
                tg.start_soon(self._start_routers, starts_recv)
                tg.start_soon(self._watch_engine, engine, thread)
                for router in [*self.topic_routers.values(), *self._direct.values()]:
                    tg.start_soon(router.run)
                for router in self.topic_routers.values():
                    self._subscribe(router.topic)
                self._ready.set()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._starts = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                engine.stop()
                await anyio.to_thread.run_sync(thread.join)
            for router in [*self.topic_routers.values(), *self._direct.values()]:
                await router.shutdown()

    @staticmethod
    async def _watch_engine(engine: Engine, thread: threading.Thread) -> None:
        # The engine only stops when asked; if its thread ends on its own, say so loudly
        # rather than leaving an application that waits for messages that cannot come.
        await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        raise RuntimeError(f"the libp2p engine stopped unexpectedly: {engine.error!r}")

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
            router._inbox.send.send_nowait(
                _DirectDelivery(event, DirectMessage(event.origin, event.stream, event.payload))
            )
            return
        topic_router = self.topic_routers.get(event.stream)
        if topic_router is None:
            self._bad_payload(event.origin, f"message on unregistered topic {event.stream!r}")
            self._consumed(event.origin, event.stream, event.end, False)
            return
        topic_router._inbox.send.send_nowait(event)

    def accepted(self, count: int) -> None:
        """The engine took `count` messages into protocol windows."""
        assert self._slots is not None
        for _ in range(count):
            self._slots.release()

    def connection(self, peer: str, connected: bool) -> None:
        """A connection to `peer` opened or closed."""
        (self.connected.add if connected else self.connected.discard)(peer)
        router = self.topic_routers.get(CONNECTION_MESSAGES.topic)
        if router is not None:
            # Through the topic's inbox, so connection events keep the engine's order.
            router._inbox.send.send_nowait(self.connection_message(peer, connected))

    def connection_message(self, peer: str, connected: bool) -> Any:
        """The item a connection event puts on `connection_messages` (exo's adapter
        overrides this to give exo's own pydantic ConnectionMessage)."""
        return ConnectionMessage(node_id=peer, connected=connected)

    def protocol_event(self, event: Gap | Unrecoverable | Rejected) -> None:
        """A loss verdict or a rejected input; kept for inspection, already logged."""
        self.protocol_events.append(event)

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

    async def _publish_bytes(self, topic: str, data: bytes) -> None:
        engine = self._running_engine()
        self._check_size(data)
        assert self._slots is not None
        await self._slots.acquire()
        engine.submit_publish(topic, data)

    def _consumed(self, origin: str, stream: str, upto: int, direct: bool) -> None:
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
            engine.submit_call(lambda: engine.penalize(peer, kind))

    def _bad_payload(self, peer: str, reason: str) -> None:
        self.bad_payloads[peer] += 1
        self.refused(peer, "bad payload", reason)


@attrs.frozen
class _DirectDelivery:
    event: Delivered
    message: DirectMessage


def _loop_poster() -> Callable[..., None]:
    """A thread-safe `post(fn, *args)` onto the calling event loop, for either backend."""
    library = sniffio.current_async_library()
    call: Callable[..., Any]
    if library == "asyncio":
        call = asyncio.get_running_loop().call_soon_threadsafe
    elif library == "trio":
        call = trio.lowlevel.current_trio_token().run_sync_soon
    else:
        raise RuntimeError(f"unsupported async library {library!r}")

    def post(fn: Callable[..., None], *args: Any) -> None:
        try:
            call(fn, *args)
        except (RuntimeError, trio.RunFinishedError):
            pass  # the application's loop is gone: nobody is left to tell

    return post
