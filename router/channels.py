"""Channels that behave like exo's `exo.utils.channels`: anyio memory object streams plus
`clone_sender`, `clone_receiver`, `collect` and `receive_at_least`.

Errors are anyio's own (`ClosedResourceError`, `BrokenResourceError`, `EndOfStream`,
`WouldBlock`), so code written against exo's channels runs unchanged.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

from anyio import ClosedResourceError, WouldBlock
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

try:  # anyio >= 4.12
    from anyio.streams.memory import _MemoryObjectStreamState
except ImportError:  # anyio 4.11, the version exo pins
    from anyio.streams.memory import (  # type: ignore[attr-defined,no-redef]
        MemoryObjectStreamState as _MemoryObjectStreamState,
    )

T = TypeVar("T")

# Our router bounds every receiver (a full one slows the publishers instead of growing
# without limit); exo's own channels default to unbounded.
DEFAULT_BUFFER = 10_000


class Sender(MemoryObjectSendStream[T], Generic[T]):
    """The sending end of a channel."""

    def clone(self) -> Sender[T]:
        """Another sender on the same channel (the channel closes when all senders do)."""
        if self._closed:
            raise ClosedResourceError
        return Sender(_state=self._state)

    def clone_receiver(self) -> Receiver[T]:
        """A receiver on this sender's channel."""
        if self._closed:
            raise ClosedResourceError
        return Receiver(_state=self._state)


class Receiver(MemoryObjectReceiveStream[T], Generic[T]):
    """The receiving end of a channel."""

    def clone(self) -> Receiver[T]:
        """Another receiver sharing the same items (each item goes to one of them)."""
        if self._closed:
            raise ClosedResourceError
        return Receiver(_state=self._state)

    def clone_sender(self) -> Sender[T]:
        """A sender on this receiver's channel."""
        if self._closed:
            raise ClosedResourceError
        return Sender(_state=self._state)

    def collect(self) -> list[T]:
        """Every item available now, without waiting."""
        out: list[T] = []
        while True:
            try:
                out.append(self.receive_nowait())
            except WouldBlock:
                return out

    async def receive_at_least(self, n: int) -> list[T]:
        """Wait for at least `n` items; return them and whatever else is ready."""
        out = [await self.receive(), *self.collect()]
        while len(out) < n:
            out.append(await self.receive())
            out.extend(self.collect())
        return out

    def __enter__(self) -> Receiver[T]:
        return self


class channel(Generic[T]):
    """`channel[T](max_buffer_size)`: a (Sender, Receiver) pair holding up to that many items
    (math.inf: unbounded)."""

    def __new__(  # type: ignore[misc]
        cls, max_buffer_size: float = DEFAULT_BUFFER
    ) -> tuple[Sender[T], Receiver[T]]:
        if max_buffer_size != math.inf and not isinstance(max_buffer_size, int):
            raise ValueError("max_buffer_size must be an integer or math.inf")
        state: _MemoryObjectStreamState[T] = _MemoryObjectStreamState(max_buffer_size)
        return Sender(_state=state), Receiver(_state=state)
