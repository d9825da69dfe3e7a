"""A stage node's inbox: the pipeline messages from its direct streams, decoded (one that is
not a pipeline message, or not one of its stream's, is counted and refused), queued for its
one worker in arrival order; and the token feedback a one-stage node gives itself.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import anyio
import attrs

from inference_glue.messages import Message, MessageDecodeError, decode_message
from inference_glue.node_counters import NodeCounters
from router import DirectMessage, RouterLike

if TYPE_CHECKING:
    from inference_glue.link_watch import LinkLost

__all__ = ["WORK_QUEUE", "NodeInbox", "Work"]

# Messages waiting for the compute worker; beyond this the direct streams hold their senders
# back (the router's flow control), so memory stays bounded.
WORK_QUEUE = 256


@attrs.frozen
class Work:
    """A message for the node's worker, from `peer` on `stream`."""

    stream: str
    peer: str
    message: Message | LinkLost


class NodeInbox:
    """Decodes what `router`'s direct streams bring (`pump`) and hands the worker its next
    message (`next`), the node's own (`feed`) first."""

    def __init__(self, router: RouterLike, counters: NodeCounters) -> None:
        self.router = router
        self.counters = counters
        self._own: deque[Work] = deque()

    def decode(self, item: DirectMessage) -> Message | None:
        """The pipeline message `item` carries; None (counted, refused) if it is not one."""
        try:
            return decode_message(item.payload)
        except MessageDecodeError as exc:
            self.counters.bad_messages += 1
            self.router.refused(item.peer, "bad pipeline message", f"on {item.stream}: {exc}")
            return None

    def unexpected(self, peer: str, message: Message, stream: str) -> None:
        """`peer` sent a message that does not belong on `stream`: counted, refused."""
        self.counters.bad_messages += 1
        self.router.refused(
            peer, "unexpected pipeline message", f"{type(message).__name__} on {stream}"
        )

    async def pump(self, stream: str, work: anyio.abc.ObjectSendStream[Work]) -> None:
        """Queue the messages of direct stream `stream` until cancelled."""
        async with work:
            async for item in self.router.direct_receiver(stream):
                message = self.decode(item)
                if message is not None:
                    await work.send(Work(stream, item.peer, message))

    def feed(self, item: Work) -> None:
        """A message of the node to itself (a one-stage node's token feedback)."""
        self._own.append(item)

    def clear_own(self) -> None:
        """Forget the node's messages to itself (its requests were dropped)."""
        self._own.clear()

    async def next(self, work: anyio.abc.ObjectReceiveStream[Work]) -> Work:
        """The worker's next message: the node's own first, else the next queued."""
        if self._own:
            # A one-stage node feeds itself: let the rest of the process (its client, an
            # API in the same process) run between tokens.
            await anyio.lowlevel.checkpoint()
            return self._own.popleft()
        return await work.receive()
