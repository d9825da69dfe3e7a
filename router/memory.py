"""Routers in one process: a double of the network for fast in-process tests of what runs
over a router (the stage node, the pipeline client, its failover driver).

    network = MemoryNetwork()
    a, b = network.router("node-a"), network.router("node-b")
    # run both (a.run(), b.run()); they are connected to each other once both run

Like the simulated network under the protocol core (`p2p_reliable.testing`), but one layer
up: what a `MemoryRouter` sends arrives at once, in order, exactly once, and goes through the
same `TopicRouter`s as over py-libp2p (typed topics serialized and checked, items published
to local receivers too, direct messages held until a receiver exists). No protocol runs
underneath, so there are no protocol counters. The faults tests need are the network's:
`kill` (a SIGKILLed process: its connections close), `hang` (a SIGSTOPped one: connections
stay open, nothing gets through, peers see it DEAD) and `resume`; and a router's partition
(`set_faults`), whose direct messages are given up at once (`Unrecoverable`).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from p2p_reliable import Delivered, Gap, Rejected, Unrecoverable

from .channels import DEFAULT_BUFFER, Receiver, Sender
from .faults import FaultConfig
from .topic_router import DirectDelivery, DirectMessage, TopicRouter
from .topics import CONNECTION_MESSAGES, ConnectionMessage, PublishPolicy, TypedTopic

if TYPE_CHECKING:
    from .interface import RouterLike

__all__ = ["MemoryNetwork", "MemoryRouter"]

log = logging.getLogger("p2pr.router.memory")

T = TypeVar("T")


class MemoryNetwork:
    """The routers of one process, each connected to every other while both run."""

    def __init__(self) -> None:
        self.routers: dict[str, MemoryRouter] = {}
        self.running: set[str] = set()
        self.hung: set[str] = set()

    def router(self, node_id: str, receiver_buffer: float = DEFAULT_BUFFER) -> MemoryRouter:
        """A new router on this network."""
        if node_id in self.routers:
            raise ValueError(f"{node_id!r} is on the network already")
        router = MemoryRouter(self, node_id, receiver_buffer)
        self.routers[node_id] = router
        return router

    def reaches(self, source: str, target: str) -> bool:
        """Whether what `source` sends gets to `target` now."""
        if source not in self.running or target not in self.running:
            return False
        if source in self.hung or target in self.hung:
            return False
        return target not in self.routers[source].partitioned

    def kill(self, node_id: str) -> None:
        """`node_id` is gone, as after a SIGKILL: the others hear its connection close and
        nothing reaches it any more (cancel the task that runs it too)."""
        self._leave(self.routers[node_id])

    def hang(self, node_id: str) -> None:
        """`node_id` hangs (SIGSTOP): its connections stay open, nothing gets through either
        way, and the others' health views call it DEAD."""
        self.hung.add(node_id)

    def resume(self, node_id: str) -> None:
        """`node_id` runs again after `hang`."""
        self.hung.discard(node_id)

    def _join(self, router: MemoryRouter) -> None:
        self.running.add(router.node_id)
        for other in self._others(router):
            other._connection(router.node_id, True)
            router._connection(other.node_id, True)

    def _leave(self, router: MemoryRouter) -> None:
        if router.node_id not in self.running:
            return
        self.running.discard(router.node_id)
        for other in self._others(router):
            other._connection(router.node_id, False)
            router._connection(other.node_id, False)

    def _others(self, router: MemoryRouter) -> list[MemoryRouter]:
        return [r for r in self.routers.values() if r is not router and r.node_id in self.running]

    def _subscribed(self, router: MemoryRouter) -> None:
        for other in self.routers.values():
            other._subscribers_changed()


class MemoryRouter:
    """A router whose network is a `MemoryNetwork` (see the module docstring); it provides
    `RouterLike`, the part of `Router` the layers above use."""

    def __init__(self, network: MemoryNetwork, node_id: str, receiver_buffer: float) -> None:
        self.network = network
        self._node_id = node_id
        self._buffer = receiver_buffer
        self.topic_routers: dict[str, TopicRouter[Any]] = {}
        self._direct: dict[str, TopicRouter[DirectMessage]] = {}
        self.connected: set[str] = set()
        self.bad_payloads: Counter[str] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()
        self.protocol_events: deque[Gap | Unrecoverable | Rejected] = deque(maxlen=1000)
        self.faults: FaultConfig | None = None
        self.partitioned: frozenset[str] = frozenset()
        self.dialed: list[tuple[str, str]] = []  # (address, source) given to add_peer_addr
        self._seq = 0
        self._tg: TaskGroup | None = None
        self._ready: anyio.Event | None = None
        self._subscribers_event: anyio.Event | None = None
        self._protocol_event: anyio.Event | None = None

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def listen_addrs(self) -> list[str]:
        return [f"/memory/{self._node_id}/p2p/{self._node_id}"]

    # -- topics and streams ----------------------------------------------------------------

    async def register_topic(self, topic: TypedTopic[T]) -> None:
        router = TopicRouter[T](topic, self, self._buffer)
        self.topic_routers[topic.topic] = router
        if self._tg is not None:
            self._tg.start_soon(router.run)
        self.network._subscribed(self)

    def sender(self, topic: TypedTopic[T]) -> Sender[T]:
        return self._topic_router(topic).new_sender()

    def receiver(self, topic: TypedTopic[T]) -> Receiver[T]:
        return self._topic_router(topic).new_receiver()

    def direct_receiver(self, stream: str) -> Receiver[DirectMessage]:
        return self._direct_router(stream).new_receiver()

    def _topic_router(self, topic: TypedTopic[T]) -> TopicRouter[T]:
        router = self.topic_routers.get(topic.topic)
        if router is None:
            raise KeyError(f"topic {topic.topic!r} is not registered")
        return router

    def _direct_router(self, stream: str) -> TopicRouter[DirectMessage]:
        router = self._direct.get(stream)
        if router is None:
            topic = TypedTopic(stream, PublishPolicy.Never, DirectMessage)
            router = TopicRouter(topic, self, self._buffer, hold=True)
            self._direct[stream] = router
            if self._tg is not None:
                self._tg.start_soon(router.run)
        return router

    async def send_to(self, peer: str, stream: str, payload: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        target = self.network.routers.get(peer)
        if target is None or not self.network.reaches(self._node_id, peer):
            if peer in self.partitioned and peer in self.network.running:
                # What a partition longer than the retry budget ends in, without the wait.
                self._verdict(Unrecoverable(stream, self._seq, peer, "partitioned"))
            return  # lost with the peer: its requester finds out by the connection or time
        self._seq += 1
        event = Delivered(self._node_id, stream, self._seq, payload, True, self._seq + 1)
        message = DirectMessage(self._node_id, stream, payload)
        target._direct_router(stream).inbox.send.send_nowait(DirectDelivery(event, message))

    # -- TopicNetwork: what the TopicRouters ask of their router ---------------------------

    async def publish_encoded(self, topic: str, data: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        for peer in sorted(self.subscribers(topic)):
            if self.network.reaches(self._node_id, peer):
                self._seq += 1
                event = Delivered(self._node_id, topic, self._seq, data, False, self._seq + 1)
                self.network.routers[peer].topic_routers[topic].inbox.send.send_nowait(event)

    def consumed(self, origin: str, stream: str, upto: int, direct: bool) -> None:
        """Nothing to do: no protocol credit in memory."""

    def bad_payload(self, peer: str, reason: str) -> None:
        self.bad_payloads[peer] += 1
        self.refused(peer, "bad payload", reason)

    def local_item_done(self) -> None:
        """Nothing to do: `drain` has nothing to wait for."""

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        if self._ready is None:
            self._ready = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for router in [*self.topic_routers.values(), *self._direct.values()]:
                    tg.start_soon(router.run)
                self.network._join(self)
                self._ready.set()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self.network._leave(self)
            for router in [*self.topic_routers.values(), *self._direct.values()]:
                await router.shutdown()

    async def wait_ready(self) -> None:
        if self._ready is None:
            self._ready = anyio.Event()
        await self._ready.wait()

    async def drain(self) -> None:
        await anyio.lowlevel.checkpoint()  # delivered at once: nothing waits for an ack

    def _connection(self, peer: str, connected: bool) -> None:
        (self.connected.add if connected else self.connected.discard)(peer)
        router = self.topic_routers.get(CONNECTION_MESSAGES.topic)
        if router is not None:
            router.inbox.send.send_nowait(ConnectionMessage(node_id=peer, connected=connected))
        self._subscribers_changed()

    # -- views and counters ----------------------------------------------------------------

    def subscribers(self, topic: str) -> set[str]:
        return {
            r.node_id
            for r in self.network.routers.values()
            if r is not self and r.node_id in self.connected and topic in r.topic_routers
        }

    async def wait_for_subscriber(self, topic: str, peer: str) -> None:
        while peer not in self.subscribers(topic):
            if self._subscribers_event is None:
                self._subscribers_event = anyio.Event()
            await self._subscribers_event.wait()

    def _subscribers_changed(self) -> None:
        event, self._subscribers_event = self._subscribers_event, None
        if event is not None:
            event.set()

    def _verdict(self, event: Gap | Unrecoverable | Rejected) -> None:
        self.protocol_events.append(event)
        waiting, self._protocol_event = self._protocol_event, None
        if waiting is not None:
            waiting.set()

    async def wait_protocol_event(self) -> None:
        if self._protocol_event is None:
            self._protocol_event = anyio.Event()
        await self._protocol_event.wait()

    async def health(self) -> list[dict[str, Any]]:
        await anyio.lowlevel.checkpoint()
        return [
            {"peer": peer, "state": "DEAD" if peer in self.network.hung else "ALIVE"}
            for peer in sorted(self.connected)
        ]

    async def health_states(self) -> dict[str, str]:
        return {row["peer"]: row["state"] for row in await self.health()}

    async def counters(self, timeout: float | None = None) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return {"protocol": {}, "shim": {}, "peers": {peer: {} for peer in self.connected}}

    def set_faults(self, faults: FaultConfig | None, partition: Collection[str] = ()) -> None:
        if self._tg is None:
            raise RuntimeError("the router is not running")
        self.faults = faults  # recorded: no frames here to damage
        self.partitioned = frozenset(partition)

    def refused(self, peer: str, kind: str, detail: str) -> None:
        self.refusals[(peer, kind)] += 1
        log.debug("refused a message from %s: %s: %s", peer, kind, detail)

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        self.dialed.append((addr, source))


if TYPE_CHECKING:
    _provides: type[RouterLike] = MemoryRouter  # checked by mypy: it is a RouterLike
