"""What reaches a pipeline client from its router, sent where it belongs: token chunks (from
the topic or a direct stream) and stage failures to the stream of their request, replies to
the request/reply helper, and connection events and protocol verdicts to every stream in
flight, which then looks at its stages at once.

Input from the network is hostile: a chunk or message that does not decode is counted and
refused (against its sender), a chunk of another client's request is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from inference_glue.messages import (
    Failure,
    InfoReply,
    MessageDecodeError,
    StatsReply,
    decode_message,
)
from inference_glue.rpc import RequestReply
from inference_glue.tokens import TokenChunk, TokenChunkDecodeError
from router import ConnectionMessage, DirectMessage, Receiver, RouterLike

__all__ = ["WAKE", "ClientInbox", "StreamItem", "Wake"]


@attrs.frozen
class Wake:
    """Put in a stream's channel when a connection opens or closes, or the protocol gives a
    verdict: look at the stages."""


WAKE = Wake()

StreamItem = TokenChunk | Failure | Wake


class ClientInbox:
    """Routes the client's input; `streams` maps a request's wire id to its channel.

    Args:
        router: the client's running router.
        rpc: where replies go.
        on_connection: told of every connection event (the plan follows the nodes).
    """

    def __init__(
        self, router: RouterLike, rpc: RequestReply, on_connection: Callable[[str, bool], None]
    ) -> None:
        self.router = router
        self.rpc = rpc
        self._on_connection = on_connection
        self.streams: dict[str, MemoryObjectSendStream[StreamItem]] = {}
        self.bad_messages = 0

    def open(
        self, key: str
    ) -> tuple[MemoryObjectSendStream[StreamItem], MemoryObjectReceiveStream[StreamItem]]:
        """A channel for the request `key`'s items (unbounded: each is small, and the
        protocol's credit bounds what a node can send)."""
        send, recv = anyio.create_memory_object_stream[StreamItem](math.inf)
        self.streams[key] = send
        return send, recv

    def wake(self) -> None:
        """Every stream in flight looks at its stages."""
        for stream in list(self.streams.values()):
            stream.send_nowait(WAKE)

    async def run(
        self,
        topic_chunks: Receiver[TokenChunk],
        direct_chunks: Receiver[DirectMessage],
        replies: Receiver[DirectMessage],
        connections: Receiver[ConnectionMessage],
    ) -> None:
        """Route until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._topic_chunks, topic_chunks)
            tg.start_soon(self._direct_chunks, direct_chunks)
            tg.start_soon(self._replies, replies)
            tg.start_soon(self._connections, connections)
            tg.start_soon(self._protocol_events)

    def _to_stream(self, request_id: str, item: StreamItem) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:  # other clients' requests (or attempts given up) are not ours
            stream.send_nowait(item)

    async def _topic_chunks(self, chunks: Receiver[TokenChunk]) -> None:
        async for chunk in chunks:
            self._to_stream(chunk.request_id, chunk)

    async def _direct_chunks(self, items: Receiver[DirectMessage]) -> None:
        async for item in items:
            try:
                # Unverified here: the assembler checks the checksum and counts failures.
                chunk = TokenChunk.from_bytes(item.payload, verify=False)
            except TokenChunkDecodeError as exc:
                self.bad_messages += 1
                self.router.refused(item.peer, "bad token chunk", str(exc))
                continue
            self._to_stream(chunk.request_id, chunk)

    async def _replies(self, replies: Receiver[DirectMessage]) -> None:
        async for item in replies:
            try:
                message = decode_message(item.payload)
            except MessageDecodeError as exc:
                self.bad_messages += 1
                self.router.refused(item.peer, "bad pipeline message", str(exc))
                continue
            if isinstance(message, InfoReply | StatsReply):
                # Only the asked peer answers for itself (nonces are easy to guess).
                self.rpc.answer(item.peer, message)
            elif isinstance(message, Failure):
                self._to_stream(message.request_id, message)
            else:
                self.bad_messages += 1

    async def _connections(self, messages: Receiver[ConnectionMessage]) -> None:
        """Connection events (the router's, prompt): streams in flight look at their stages
        at once, and the plan is looked at again."""
        async for message in messages:
            self._on_connection(message.node_id, message.connected)
            self.wake()

    async def _protocol_events(self) -> None:
        """The protocol's verdicts (a gap, a message given up): streams look at once."""
        while True:
            await self.router.wait_protocol_event()
            self.wake()
