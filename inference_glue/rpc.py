"""Request and reply over direct streams, matched by nonce: the client asks stage nodes what
they serve (`InfoQuery`), for their counters (`StatsQuery`), to take a plan (`Reconfigure`)
or fault settings (`SetFaults`); each node answers on the asker's `CLIENT_STREAM`.

A reply counts only when it comes from the peer that was asked and names that peer itself
(nonces are easy to guess). Waiting is signalled: `answer` (a reply) and the owner's other
events (a connection closing) wake the waiters, which stop waiting for a peer whose
connection is gone.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio

from inference_glue.messages import (
    CLIENT_STREAM,
    CONTROL_STREAM,
    InfoQuery,
    InfoReply,
    Message,
    StatsQuery,
    StatsReply,
    encode_message,
)
from inference_glue.plan import PipelineError
from router import RouterLike

__all__ = ["RequestReply", "reply"]


async def reply(router: RouterLike, peer: str, message: Message) -> None:
    """Answer `peer` (a node's side)."""
    await router.send_to(peer, CLIENT_STREAM, encode_message(message))


class RequestReply:
    """The asking side: questions out on `CONTROL_STREAM`, replies in through `answer`.

    Args:
        router: the asker's running router.
        wait_until: waits until a condition holds, woken by `notify` (and by whatever else
            the owner hears: connections opening and closing); whether it holds.
        notify: wakes `wait_until`'s waiters.
    """

    def __init__(
        self,
        router: RouterLike,
        wait_until: Callable[[Callable[[], bool], float], Awaitable[bool]],
        notify: Callable[[], None],
    ) -> None:
        self.router = router
        self._wait_until = wait_until
        self._notify = notify
        self._replies: dict[int, InfoReply | StatsReply | None] = {}
        self._asked: dict[int, str] = {}  # nonce -> the peer whose answer it waits for
        self._nonces = itertools.count(1)

    def answer(self, peer: str, message: InfoReply | StatsReply) -> bool:
        """A reply arrived from `peer`; whether it answers a question asked of it."""
        if self._asked.get(message.nonce) == peer == message.node_id:
            self._replies[message.nonce] = message
            self._notify()
            return True
        return False

    async def query(
        self, peers: Sequence[str], kind: type[InfoQuery] | type[StatsQuery], timeout: float
    ) -> list[Any]:
        """Ask every peer the same query; their replies in order. PipelineError when one
        does not answer within `timeout` seconds."""
        replies = await self.ask({peer: kind for peer in peers}, timeout)
        silent = [p for p in peers if replies[p] is None]
        if silent:
            raise PipelineError(f"node(s) {silent} did not answer within {timeout:.0f} s")
        return [replies[p] for p in peers]

    async def ask(
        self,
        asks: Mapping[str, Callable[[int], Message]],
        timeout: float,
        optional: Sequence[str] = (),
        grace: float = 0.3,
    ) -> dict[str, Any]:
        """Send each peer the message `asks[peer](nonce)` and gather the replies carrying
        that nonce: {peer: reply or None}. Stops waiting for a peer whose connection is gone;
        peers in `optional` (that may not be stage nodes at all) get only `grace` seconds
        after the others have answered."""
        nonces: dict[str, int] = {}
        for peer, make in asks.items():
            nonce = next(self._nonces)
            self._replies[nonce] = None
            self._asked[nonce] = peer
            nonces[peer] = nonce
            await self.router.send_to(peer, CONTROL_STREAM, encode_message(make(nonce)))

        def waiting(peers: Iterable[str]) -> list[str]:
            return [
                p for p in peers if self._replies[nonces[p]] is None and p in self.router.connected
            ]

        required = [p for p in nonces if p not in optional]
        try:
            # Woken by each reply and each connection event: a peer that leaves is not
            # waited for.
            with anyio.move_on_after(timeout):
                await self._wait_until(lambda: not waiting(required), timeout)
                await self._wait_until(lambda: not waiting(optional), grace)
            return {p: self._replies[n] for p, n in nonces.items()}
        finally:
            for nonce in nonces.values():
                self._replies.pop(nonce, None)
                self._asked.pop(nonce, None)
