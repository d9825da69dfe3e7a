"""One topic of a Router: local senders in; local receivers and the network out, by policy.

A `TopicRouter` moves items between anyio channels and its `TopicNetwork` (the Router): what
local senders send goes to local receivers and to the network as the topic's publish policy
says, and what the network delivers goes to local receivers, after which its consumption is
reported back (the protocol's credit follows it: a receiver that is not read holds back the
remote publisher).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Generic, Protocol, TypeVar

import anyio
import attrs
from anyio import BrokenResourceError, ClosedResourceError
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from p2p_reliable import Delivered, MessageTooLarge

from .channels import Receiver, Sender, channel
from .topics import PublishPolicy, TopicDecodeError, TypedTopic

__all__ = ["DirectDelivery", "DirectMessage", "Inbox", "TopicNetwork", "TopicRouter"]

log = logging.getLogger("p2pr.router")

T = TypeVar("T")

# How often a TopicRouter reports consumption back to the engine at the latest (items).
_CONSUMED_BATCH = 32


@attrs.frozen
class DirectMessage:
    """A point-to-point message received from `peer` on `stream`."""

    peer: str
    stream: str
    payload: bytes


@attrs.frozen
class DirectDelivery:
    """A direct stream's delivery, with the message it carries."""

    event: Delivered
    message: DirectMessage


class TopicNetwork(Protocol):
    """What a TopicRouter needs of its router."""

    async def publish_encoded(self, topic: str, data: bytes) -> None:
        """Publish `data` (an item of `topic`, encoded) to the network."""

    def consumed(self, origin: str, stream: str, upto: int, direct: bool) -> None:
        """The application took `origin`'s messages on `stream` below `upto`."""

    def bad_payload(self, peer: str, reason: str) -> None:
        """`peer` delivered an item that is not what the topic carries."""

    def local_item_done(self) -> None:
        """An item from a local sender went where its policy sends it."""


class Inbox:
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
        self, topic: TypedTopic[T], network: TopicNetwork, buffer: float, *, hold: bool = False
    ) -> None:
        self.topic = topic
        self.senders: set[Sender[T]] = set()
        self._buffer = buffer
        self._send, self.receiver = channel[T](buffer)
        self._network = network
        self.inbox = Inbox()
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
                self._network.local_item_done()

    async def _route_local(self, item: T, policy: PublishPolicy) -> None:
        no_local = not self.senders
        if policy is PublishPolicy.Always or (policy is PublishPolicy.Minimal and no_local):
            await self._send_out(item)
        if policy is not PublishPolicy.Minimal or not no_local:
            await self.publish(item)

    async def _network_loop(self) -> None:
        pending: dict[tuple[str, bool], int] = {}
        count = 0
        async for item in self.inbox.recv:
            while self._hold and not self.senders:
                self._receiver_added = anyio.Event()
                await self._receiver_added.wait()
            if isinstance(item, Delivered):
                try:
                    value = self.topic.deserialize(item.payload)
                    self.topic.check_origin(value, item.origin)
                except TopicDecodeError as exc:
                    self._network.bad_payload(item.origin, str(exc))
                else:
                    await self.publish(value)
                pending[(item.origin, False)] = item.end
                count += 1
            elif isinstance(item, DirectDelivery):
                await self.publish(item.message)  # type: ignore[arg-type]
                pending[(item.event.origin, True)] = item.event.end
                count += 1
            else:
                await self.publish(item)
            idle = not self.inbox.recv.statistics().current_buffer_used
            if pending and (count >= _CONSUMED_BATCH or idle):
                for (origin, direct), end in pending.items():
                    self._network.consumed(origin, self.topic.topic, end, direct)
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

    def local_busy(self) -> bool:
        """An item is on its way from a local sender to the network."""
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
        self.inbox.send.close()

    async def _send_out(self, item: T) -> None:
        data = self.topic.serialize(item)
        try:
            await self._network.publish_encoded(self.topic.topic, data)
        except MessageTooLarge as exc:
            log.error("topic %s: item not sent: %s", self.topic.topic, exc)
