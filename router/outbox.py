"""Messages on their way into the protocol.

A message enters the protocol (and its retransmission timer starts) only while its window
has room and at most `transport_backlog` bytes wait for libp2p on its path: a long transport
queue would make every timer fire early and flood the network. Until then it waits here, in
order per (peer, stream), and is admitted on `WindowOpen` or when the transport drains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from p2p_reliable import Endpoint, WindowFull

__all__ = ["Outbox"]


class Outbox:
    """Holds messages back until their window and their path's transport have room.

    Args:
        endpoint: the protocol endpoint messages enter.
        transport_backlog: bytes that may wait for libp2p on a path before messages wait.
        backlog: bytes waiting for libp2p towards a peer (None: topic frames).
        accepted: a message entered the protocol.
        now: the engine's clock.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        transport_backlog: int,
        backlog: Callable[[str | None], int],
        accepted: Callable[[], None],
        now: Callable[[], float],
    ) -> None:
        self.endpoint = endpoint
        self.transport_backlog = transport_backlog
        self._backlog = backlog
        self._accepted = accepted
        self._now = now
        self._blocked: dict[tuple[str | None, str], deque[bytes]] = {}

    def offer(self, peer: str | None, stream: str, data: bytes) -> None:
        """A message to publish on topic `stream` (peer None) or to send to `peer`."""
        key = (peer, stream)
        pending = self._blocked.get(key)
        if pending:
            pending.append(data)
            return
        if not self._try_send(peer, stream, data):
            self._blocked.setdefault(key, deque()).append(data)

    @property
    def streams_waiting(self) -> int:
        """Streams with messages waiting (each kept only while it has some)."""
        return len(self._blocked)

    def idle(self) -> bool:
        """No message waits."""
        return not self._blocked

    def retry(self, peer: str | None, stream: str) -> None:
        """Admit what waits on (peer, stream), in order, while there is room."""
        key = (peer, stream)
        pending = self._blocked.get(key)
        while pending:
            if not self._try_send(peer, stream, pending[0]):
                return
            pending.popleft()
        # Emptied queues go: every request has streams of its own, and the drain below
        # looks at each queue kept (it had grown by one per request, and cost per frame).
        self._blocked.pop(key, None)

    def drained(self, peer: str | None) -> bool:
        """libp2p took frames towards `peer` (None: gossipsub): admit messages that waited
        for transport room. Whether any message was waiting on that path."""
        keys = [k for k in self._blocked if k[0] in (peer, None)]
        for key in keys:
            if self._backlog(key[0]) <= self.transport_backlog // 2:
                self.retry(*key)
        return bool(keys)

    def _try_send(self, peer: str | None, stream: str, data: bytes) -> bool:
        if self._backlog(peer) > self.transport_backlog:
            return False
        now = self._now()
        try:
            if peer is None:
                self.endpoint.publish(stream, data, now)
            else:
                self.endpoint.send(peer, stream, data, now)
        except WindowFull:
            return False
        self._accepted()
        return True
