"""A seeded, deterministic network in virtual time, for driving Endpoints through faults.

Every frame an endpoint emits is scheduled for delivery through a link that may drop,
duplicate, delay, reorder or corrupt it, or be partitioned. The same seed replays the same
run exactly, so a failing schedule found by hypothesis can be reproduced and debugged.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable

import attrs

from ..config import ProtocolConfig
from ..endpoint import Endpoint
from ..events import Delivered, Event, Gap, Rejected, Unrecoverable, WindowOpen
from ..sender import WindowFull


@attrs.frozen
class LinkFaults:
    """Fault probabilities (per frame) and latencies (seconds) of a directed link."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # probability that a frame is held back by up to `reorder_delay`
    corrupt: float = 0.0  # probability that 1-3 bytes of a frame are overwritten
    delay: float = 0.001
    jitter: float = 0.0005
    reorder_delay: float = 0.02
    # Bytes per second the link serialises, frames queueing behind each other; None: no limit.
    bandwidth: float | None = None


@attrs.frozen
class Partition:
    """Frames between `a` and `b` (both ways unless one_way) vanish during [start, end)."""

    a: str
    b: str
    start: float
    end: float | None  # None: never heals
    one_way: bool = False

    def blocks(self, src: str, dst: str, now: float) -> bool:
        """Whether a frame from `src` to `dst` sent at `now` is lost to this partition."""
        if now < self.start or (self.end is not None and now >= self.end):
            return False
        if (src, dst) == (self.a, self.b):
            return True
        return not self.one_way and (src, dst) == (self.b, self.a)


@attrs.define
class LinkStats:
    """What the network did to frames, for reports."""

    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    partitioned: int = 0


# A hook that may veto a single frame (src, dst, data) -> drop?; fault injection with precision.
DropFilter = Callable[[str, str, bytes], bool]


class SimNode:
    """An Endpoint plus its application: queued sends and everything it was told."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.outgoing: deque[tuple[str | None, str, bytes]] = deque()  # (peer, stream, payload)
        self.events: list[Event] = []
        self.event_times: list[float] = []  # the virtual time each event was drained at
        # (time, peer, stream, seq) of every message the endpoint accepted, in order.
        self.published: list[tuple[float, str | None, str, int]] = []
        self.alive = True
        # With flow control, report each delivery as consumed at once (an eager application).
        self.auto_consume = True

    @property
    def node_id(self) -> str:
        """The endpoint's id."""
        return self.endpoint.node_id

    def delivered(self, stream: str | None = None) -> list[Delivered]:
        """Messages delivered to the application, optionally of one stream."""
        return [
            e
            for e in self.events
            if isinstance(e, Delivered) and (stream is None or e.stream == stream)
        ]

    def delivered_at(self, stream: str | None = None) -> list[tuple[float, Delivered]]:
        """(virtual time, message) of each delivery, optionally of one stream."""
        return [
            (t, e)
            for t, e in zip(self.event_times, self.events, strict=True)
            if isinstance(e, Delivered) and (stream is None or e.stream == stream)
        ]

    def gaps(self) -> list[Gap]:
        """Gap events received."""
        return [e for e in self.events if isinstance(e, Gap)]

    def unrecoverable(self) -> list[Unrecoverable]:
        """Unrecoverable verdicts received."""
        return [e for e in self.events if isinstance(e, Unrecoverable)]

    def rejected(self) -> list[Rejected]:
        """Counted rejections of bad input."""
        return [e for e in self.events if isinstance(e, Rejected)]

    def pump(self, now: float) -> None:
        """Hand queued application messages to the endpoint until a window is full."""
        while self.outgoing:
            peer, stream, payload = self.outgoing[0]
            try:
                if peer is None:
                    seq = self.endpoint.publish(stream, payload, now)
                else:
                    seq = self.endpoint.send(peer, stream, payload, now)
            except WindowFull:
                return
            self.published.append((now, peer, stream, seq))
            self.outgoing.popleft()


class SimNetwork:
    """Endpoints connected by faulty links, run in virtual time."""

    def __init__(self, seed: int, faults: LinkFaults | None = None) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = 0.0
        self.default_faults = faults or LinkFaults()
        self.links: dict[tuple[str, str], LinkFaults] = {}
        self.partitions: list[Partition] = []
        self.drop_filter: DropFilter | None = None
        self.nodes: dict[str, SimNode] = {}
        self.subscriptions: dict[str, set[str]] = {}
        self.stats = LinkStats()
        self._queue: list[tuple[float, int, str, str, bytes]] = []
        self._busy_until: dict[tuple[str, str], float] = {}  # links with a bandwidth
        self._actions: list[tuple[float, int, Callable[[], None]]] = []
        self._order = 0
        self.steps = 0

    # -- building --------------------------------------------------------------------------

    def add_node(
        self, node_id: str, config: ProtocolConfig | None = None, epoch: int = 1
    ) -> SimNode:
        """Create an endpoint and connect it to every existing node."""
        endpoint = Endpoint(node_id, epoch=epoch, config=config, seed=self.rng.getrandbits(64))
        node = SimNode(endpoint)
        for other in self.nodes.values():
            other.endpoint.add_peer(node_id, self.now)
            endpoint.add_peer(other.node_id, self.now)
        self.nodes[node_id] = node
        for topic, members in self.subscriptions.items():
            for member in members:
                endpoint.add_subscriber(topic, member, self.now)
        return node

    def subscribe(self, node_id: str, topic: str, learned_after: float = 0.0) -> None:
        """`node_id` joins `topic` (its frames reach it at once, as gossipsub's would); every
        other node learns it has a new subscriber `learned_after` seconds later."""
        self.subscriptions.setdefault(topic, set()).add(node_id)
        self.nodes[node_id].endpoint.subscribe(topic, self.now)
        for other in self.nodes.values():
            if other.node_id != node_id:
                endpoint = other.endpoint

                def learn(endpoint: Endpoint = endpoint) -> None:
                    endpoint.add_subscriber(topic, node_id, self.now)

                if learned_after > 0:
                    self.at(self.now + learned_after, learn)
                else:
                    learn()

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` (e.g. a membership change) at virtual time `when`."""
        self._order += 1
        heapq.heappush(self._actions, (when, self._order, action))

    def set_link(self, src: str, dst: str, faults: LinkFaults) -> None:
        """Override the faults of the directed link src -> dst."""
        self.links[(src, dst)] = faults

    def partition(
        self, a: str, b: str, start: float, end: float | None, *, one_way: bool = False
    ) -> None:
        """Cut a <-> b (or only a -> b) from `start` until `end` (None: forever)."""
        self.partitions.append(Partition(a, b, start, end, one_way))

    def kill(self, node_id: str) -> None:
        """The node stops: it sends nothing more and every frame to it is lost."""
        self.nodes[node_id].alive = False

    # -- application -----------------------------------------------------------------------

    def publish(self, node_id: str, topic: str, payload: bytes) -> None:
        """Queue a broadcast; it enters the protocol as soon as the window allows."""
        self.nodes[node_id].outgoing.append((None, topic, payload))

    def send(self, node_id: str, peer: str, stream: str, payload: bytes) -> None:
        """Queue a direct message to `peer`."""
        self.nodes[node_id].outgoing.append((peer, stream, payload))

    # -- running ---------------------------------------------------------------------------

    def run(self, until: float, max_steps: int = 1_000_000) -> None:
        """Advance virtual time to `until` (bounded by `max_steps` iterations)."""
        self.run_until(lambda: False, until, max_steps)

    def run_until(
        self, predicate: Callable[[], bool], until: float, max_steps: int = 1_000_000
    ) -> bool:
        """Run until `predicate()` holds or time `until`; return whether it held."""
        self._flush()
        for _ in range(max_steps):
            if predicate():
                return True
            nxt = self._next_time()
            if nxt is None or nxt > until:
                self.now = max(self.now, until)
                return predicate()
            self.now = max(self.now, nxt)
            self._step()
        raise RuntimeError(f"simulation did not settle within {max_steps} steps")

    def _next_time(self) -> float | None:
        times = [self._queue[0][0]] if self._queue else []
        if self._actions:
            times.append(self._actions[0][0])
        for node in self.nodes.values():
            if node.alive:
                timer = node.endpoint.get_timer()
                if timer is not None:
                    times.append(timer)
        return min(times) if times else None

    def _step(self) -> None:
        self.steps += 1
        while self._queue and self._queue[0][0] <= self.now:
            _, _, src, dst, data = heapq.heappop(self._queue)
            node = self.nodes.get(dst)
            if node is not None and node.alive:
                node.endpoint.receive(data, src, self.now)
        while self._actions and self._actions[0][0] <= self.now:
            heapq.heappop(self._actions)[2]()
        for node in self.nodes.values():
            if not node.alive:
                continue
            timer = node.endpoint.get_timer()
            if timer is not None and timer <= self.now:
                node.endpoint.handle_timer(self.now)
        self._flush()

    def _flush(self) -> None:
        for node in self.nodes.values():
            if not node.alive:
                continue
            node.pump(self.now)
            while (event := node.endpoint.next_event()) is not None:
                node.events.append(event)
                node.event_times.append(self.now)
                if isinstance(event, WindowOpen):
                    node.pump(self.now)
                elif isinstance(event, Delivered) and node.auto_consume:
                    node.endpoint.consumed(
                        event.origin, event.stream, event.end, self.now, event.direct
                    )
            for tx in node.endpoint.datagrams_to_send(self.now):
                if tx.peer is not None:
                    targets = [tx.peer]
                else:
                    members = self.subscriptions.get(tx.topic or "", set())
                    targets = sorted(m for m in members if m != node.node_id)
                for dst in targets:
                    self._transmit(node.node_id, dst, tx.data)

    def _transmit(self, src: str, dst: str, data: bytes) -> None:
        faults = self.links.get((src, dst), self.default_faults)
        rng = self.rng
        self.stats.frames += 1
        if any(p.blocks(src, dst, self.now) for p in self.partitions):
            self.stats.partitioned += 1
            return
        if self.drop_filter is not None and self.drop_filter(src, dst, data):
            self.stats.dropped += 1
            return
        if rng.random() < faults.drop:
            self.stats.dropped += 1
            return
        copies = 1
        if rng.random() < faults.duplicate:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            payload = data
            if rng.random() < faults.corrupt:
                payload = self._corrupt(data)
                self.stats.corrupted += 1
            delay = faults.delay + rng.uniform(0.0, faults.jitter)
            if faults.bandwidth is not None:
                start = max(self.now, self._busy_until.get((src, dst), self.now))
                self._busy_until[(src, dst)] = start + len(payload) / faults.bandwidth
                delay += self._busy_until[(src, dst)] - self.now
            if rng.random() < faults.reorder:
                delay += rng.uniform(0.0, faults.reorder_delay)
                self.stats.reordered += 1
            self._order += 1
            heapq.heappush(self._queue, (self.now + delay, self._order, src, dst, payload))

    def _corrupt(self, data: bytes) -> bytes:
        damaged = bytearray(data)
        for _ in range(self.rng.randint(1, 3)):
            pos = self.rng.randrange(len(damaged))
            damaged[pos] ^= self.rng.randint(1, 255)
        return bytes(damaged)
