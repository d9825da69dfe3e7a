"""The gossipsub side of the engine: topic frames out (never beyond gossipsub's queues' room),
topic frames in, and who subscribes to each topic.

Runs on the engine's trio loop. Subscribers of a topic are the union of two sources: what
gossipsub reports (for peers that never said hello) and what peers' hellos say
(`router/membership.py`); the engine hears every change (`changed`) and tells the protocol.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub

__all__ = ["GossipLink"]


class GossipLink:
    """Publishes queued topic frames through gossipsub and receives its subscriptions.

    Args:
        queue_high_water: publish only while every gossipsub per-peer queue holds at most
            this many RPCs (gossipsub silently rejects beyond its 32).
        poll_interval: how often gossipsub's subscriber map is read.
        receive: a frame arrived from `origin` on a subscribed topic.
        drained: gossipsub took a frame (the engine admits waiting messages).
        members: the subscribers of a topic that peers' hellos report.
        changed: a topic's subscribers changed (topic, added, removed).
    """

    def __init__(
        self,
        *,
        queue_high_water: int,
        poll_interval: float,
        receive: Callable[[bytes, str], None],
        drained: Callable[[], None],
        members: Callable[[str], set[str]],
        changed: Callable[[str, frozenset[str], frozenset[str]], None],
    ) -> None:
        self.queue_high_water = queue_high_water
        self.poll_interval = poll_interval
        self._receive = receive
        self._drained = drained
        self._members = members
        self._changed = changed
        self.topics: set[str] = set()
        self.published_frames = 0
        self.published_bytes = 0
        self.bad_origins = 0
        # The sets are replaced whole, so other threads may read them.
        self._subscribers: dict[str, frozenset[str]] = {}
        self._gossip_subscribers: dict[str, set[str]] = {}
        self._queue: deque[tuple[str, bytes]] = deque()
        self.backlog = 0  # bytes queued for gossipsub
        self._wake = trio.Event()
        self._pubsub: Pubsub | None = None
        self._own: bytes = b""

    def start(self, pubsub: Pubsub, own: ID, nursery: trio.Nursery) -> None:
        """Start publishing and watching subscribers (the pubsub service is ready)."""
        self._pubsub = pubsub
        self._own = own.to_bytes()
        nursery.start_soon(self._publish_loop)
        nursery.start_soon(self._subscriber_poll)

    def queue(self, topic: str, data: bytes) -> None:
        """Publish `data` on `topic` as soon as gossipsub has room."""
        self._queue.append((topic, data))
        self.backlog += len(data)
        self._wake.set()

    def idle(self) -> bool:
        """Nothing waits for gossipsub."""
        return not self._queue

    def subscribers(self, topic: str) -> frozenset[str]:
        """Peers subscribed to `topic` (safe from any thread)."""
        return frozenset(self._subscribers.get(topic, ()))

    async def subscribe(self, topic: str) -> None:
        """Subscribe on gossipsub and hand its messages to `receive` until cancelled."""
        assert self._pubsub is not None
        subscription = await self._pubsub.subscribe(topic)
        # Drain at once, always: py-libp2p's subscription channel holds 32 messages and
        # drops the rest with only a warning.
        async for msg in subscription:
            if msg.from_id == self._own:
                continue
            try:
                origin = ID(msg.from_id).to_base58()
            except Exception:
                self.bad_origins += 1
                continue
            self._receive(msg.data, origin)

    def update(self, topic: str) -> bool:
        """Recompute `topic`'s subscribers from both sources; True if they changed."""
        current = frozenset(self._gossip_subscribers.get(topic, set()) | self._members(topic))
        known = self._subscribers.get(topic, frozenset())
        if current == known:
            return False
        self._subscribers[topic] = current
        self._changed(topic, current - known, known - current)
        return True

    async def _publish_loop(self) -> None:
        assert self._pubsub is not None
        pubsub = self._pubsub
        high = self.queue_high_water
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            # Never let gossipsub's outbound queues reject: wait for room instead. Its queues
            # are drained by its own tasks, which signal nothing; so this looks again soon.
            while any(len(q) > high for q in pubsub.peer_queues.values()):
                await trio.sleep(0.001)
            topic, data = self._queue.popleft()
            await pubsub.publish(topic, data)
            self.backlog -= len(data)
            self.published_frames += 1
            self.published_bytes += len(data)
            self._drained()

    async def _subscriber_poll(self) -> None:
        # py-libp2p has no subscription callback: its peer_topics map is read periodically.
        # Peers that say hello (every node of ours) report their topics at once, through
        # `update`; this poll only covers peers that never say hello.
        assert self._pubsub is not None
        while True:
            for topic in self.topics:
                current = {p.to_base58() for p in self._pubsub.peer_topics.get(topic, ())}
                if current != self._gossip_subscribers.get(topic, set()):
                    self._gossip_subscribers[topic] = current
                    self.update(topic)
            await trio.sleep(self.poll_interval)
