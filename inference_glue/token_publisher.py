"""Token chunks from the last stage to their requesters, off the critical path of the next
token: the stage samples, sends the token back to the first stage at once, and hands the
chunk here.

A chunk goes to its requester alone over a direct stream (`RequestMeta.chunks == "direct"`),
or is published on the `TOKENS` topic; then it waits (bounded) until the requester is known
as a subscriber, since a chunk published earlier would not be sent to it.
"""

from __future__ import annotations

import logging

import anyio

from inference_glue.messages import CHUNK_STREAM, TOKENS, RequestMeta
from inference_glue.node_counters import NodeCounters
from inference_glue.tokens import TokenChunk
from router import RouterLike

__all__ = ["SUBSCRIBER_WAIT", "TokenPublisher"]

log = logging.getLogger("p2pr.inference.node")

# How long the last stage waits for a requester to appear as a subscriber of the token topic
# before it publishes (a chunk published earlier would not be sent to it).
SUBSCRIBER_WAIT = 15.0


class TokenPublisher:
    """Delivers the chunks handed to `put` in order, from its own task (`run`)."""

    def __init__(self, router: RouterLike, counters: NodeCounters, name: str = "") -> None:
        self.router = router
        self.counters = counters
        self.name = name
        self._send, self._recv = anyio.create_memory_object_stream[tuple[TokenChunk, RequestMeta]](
            1024
        )

    async def put(self, chunk: TokenChunk, meta: RequestMeta) -> None:
        """Queue `chunk` of the request `meta` for its requester."""
        await self._send.send((chunk, meta))

    async def run(self) -> None:
        """Deliver queued chunks until cancelled."""
        sender = None
        async with self._recv:
            async for chunk, meta in self._recv:
                if meta.chunks == "direct":
                    await self.router.send_to(meta.reply_to, CHUNK_STREAM, chunk.to_bytes())
                else:
                    if sender is None:
                        if TOKENS.topic not in self.router.topic_routers:
                            await self.router.register_topic(TOKENS)
                        sender = self.router.sender(TOKENS)
                    await self._await_subscriber(meta.reply_to, chunk.request_id)
                    await sender.send(chunk)
                self.counters.chunks_published += 1

    async def _await_subscriber(self, peer: str, request_id: str) -> None:
        """A chunk published before the requester's subscription is known here would not be
        sent to it: wait for the subscription (bounded)."""
        with anyio.move_on_after(SUBSCRIBER_WAIT):
            await self.router.wait_for_subscriber(TOKENS.topic, peer)
            return
        log.warning(
            "%s: requester %s of %r is not subscribed to %s; publishing anyway",
            self.name,
            peer,
            request_id,
            TOKENS.topic,
        )
