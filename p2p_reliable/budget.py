"""Byte credit: what a receiver holds for each peer, and what a publisher assumes it holds.

A receiver holds a peer's bytes in reorder buffers (fragments not yet deliverable) and, with
flow control, in messages delivered to the application and not yet reported consumed.
`ReceiveBudget` bounds both per peer and over all peers: data that does not fit is dropped
unacknowledged (flow, not hostility: the publisher sends it again later).

Two exceptions keep delivery going, each for one head-of-line message at a time (the next
message of its stream) and by at most `slack`, what the largest message costs: one per peer
passes that peer's budget, and one passes the total. Without them a message larger than the
budget could never arrive (an empty window admits one message, however large), and buffers
full of out-of-order data could wait forever for head-of-line fragments that do not fit. A
peer's exception needs the application to hold nothing unconsumed of that peer, so delivered
messages cannot pile up through it: a peer holds at most `peer_limit + slack`, all peers
together at most `total_limit + slack`, and delivery goes on whenever the application reads.

`SendLedger` is the publisher's side of the same bound: it charges each message to every
receiver (as `message_cost`, an upper bound of what the receiver can hold for it) until the
receiver's advertised limit shows it consumed, and holds new messages back while a peer's
total would exceed the receiver's budget. A compliant publisher therefore never makes a
receiver drop anything for bytes.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Hashable
from typing import Protocol

from .fragment import DIGEST_LEN

# Memory a buffered envelope or a delivered message costs beyond its payload (the Envelope,
# its strings, the buffer's entry, the Delivered event): a flood of tiny fragments is charged
# for what it really holds, not only for its payload bytes.
ENVELOPE_OVERHEAD = 256


def message_cost(payload_len: int, max_fragment_payload: int) -> int:
    """The most bytes a receiver can be charged for one message of `payload_len` bytes.

    Its fragments carry at most the payload plus the digest (compression is kept only when it
    shrinks) in at most this many pieces; delivered, it is the payload itself.
    """
    body = payload_len + DIGEST_LEN
    pieces = max(1, -(-body // max_fragment_payload))
    return body + pieces * ENVELOPE_OVERHEAD


class Waiter(Protocol):
    """A receiver whose next message waits for its publisher to use fewer bytes."""

    def retry(self, now: float) -> None: ...


class ReceiveBudget:
    """Bytes held per peer and in total, with the head-of-line exceptions and stalled waiters."""

    def __init__(self, peer_limit: int, total_limit: int, slack: int) -> None:
        self.peer_limit = peer_limit
        self.total_limit = total_limit
        self.slack = slack
        self.total = 0
        self._used: dict[str, int] = {}
        self._unconsumed: dict[str, int] = {}  # the part of _used delivered, not consumed
        self._peer_holder: dict[str, Hashable] = {}
        self._total_holder: Hashable | None = None
        # Receivers whose next message needs more room than the peer has now, by peer; a peer
        # whose usage went down is `woken` so that the endpoint retries them.
        self._stalled: dict[str, dict[Waiter, None]] = {}  # ordered sets: replays stay exact
        self.woken: dict[str, None] = {}

    def used(self, peer: str) -> int:
        """Bytes charged to `peer` now."""
        return self._used.get(peer, 0)

    def room(self, peer: str) -> int:
        """What `peer` may still add within its budget (negative when over it)."""
        return self.peer_limit - self.used(peer)

    def admit(self, peer: str, size: int, head: Hashable | None) -> bool:
        """Charge `size` bytes to buffer for `peer` if they fit; `head` names the head-of-line
        message they belong to, if they do, which may take (or holds) an exception."""
        used = self.used(peer) + size
        total = self.total + size
        peer_over, total_over = used > self.peer_limit, total > self.total_limit
        if peer_over or total_over:
            if head is None:
                return False
            if peer_over and (
                self._peer_holder.get(peer, head) != head
                or used > self.peer_limit + self.slack
                or self._unconsumed.get(peer, 0)
            ):
                return False
            if total_over and (
                self._total_holder not in (None, head) or total > self.total_limit + self.slack
            ):
                return False
            if peer_over:
                self._peer_holder[peer] = head
            if total_over:
                self._total_holder = head
        self._charge(peer, size)
        return True

    def _charge(self, peer: str, size: int) -> None:
        self._used[peer] = self.used(peer) + size
        self.total += size

    def deliver(self, peer: str, size: int) -> None:
        """Charge a message delivered to the application (its fragments left the buffer)."""
        self._charge(peer, size)
        self._unconsumed[peer] = self._unconsumed.get(peer, 0) + size

    def consume(self, peer: str, size: int) -> None:
        """The application consumed a delivered message (or it is forgotten)."""
        _subtract(self._unconsumed, peer, size)
        self.release(peer, size)

    def release(self, peer: str, size: int) -> None:
        """Buffered bytes of `peer` left memory (delivered, given up or freed)."""
        _subtract(self._used, peer, size)
        self.total -= size
        if peer in self._stalled:
            self.woken[peer] = None

    def release_heads(self, peer: str, owner: object, below: float) -> None:
        """`owner` passed every message below `below`: exceptions they held (as `(owner,
        first seq)`) are free again."""
        if _passed(self._peer_holder.get(peer), owner, below):
            del self._peer_holder[peer]
        if _passed(self._total_holder, owner, below):
            self._total_holder = None

    def stall(self, peer: str, waiter: Waiter) -> None:
        """`waiter` waits for `peer` to use fewer bytes."""
        self._stalled.setdefault(peer, {})[waiter] = None

    def unstall(self, peer: str, waiter: Waiter) -> None:
        """`waiter` no longer waits (it went ahead, or it is gone)."""
        waiters = self._stalled.get(peer)
        if waiters is not None:
            waiters.pop(waiter, None)
            if not waiters:
                del self._stalled[peer]

    def take_woken(self) -> list[Waiter]:
        """The waiters of every peer whose usage went down since the last call."""
        out: list[Waiter] = []
        for peer in self.woken:
            out.extend(self._stalled.pop(peer, {}))
        self.woken.clear()
        return out


class Decompression(enum.Enum):
    """Whether a compressed message may be decompressed now (`StreamAccount.decompression`)."""

    FITS = "fits"
    WAIT = "wait"  # once the application consumes, or other streams of the peer move on
    NEVER = "never"  # more than the budget can ever hold behind this stream's own data
    HOSTILE = "hostile"  # more than any compliant publisher compresses


class StreamAccount:
    """One receiver's part of the budget: its buffered fragments and, with flow control, the
    messages it delivered that the application has not consumed yet."""

    def __init__(self, budget: ReceiveBudget, peer: str, owner: Waiter) -> None:
        self.budget = budget
        self.peer = peer
        self.owner = owner
        self.buffered = 0
        self.released = 0  # consumed since the owner last told the publisher its limit
        self.stalled = False
        self._unconsumed: deque[tuple[int, int]] = deque()  # (end seq, charge)

    @property
    def unconsumed(self) -> bool:
        """Whether the application holds delivered messages it has not consumed."""
        return bool(self._unconsumed)

    def unconsumed_bytes(self) -> int:
        """What the delivered, unconsumed messages are charged (recounted)."""
        return sum(charge for _, charge in self._unconsumed)

    def admit(self, payload_len: int, head: int | None) -> bool:
        """Charge a fragment to buffer if it fits; `head`: the first seq of its message if
        that message is the next to deliver."""
        charge = payload_len + ENVELOPE_OVERHEAD
        if not self.budget.admit(self.peer, charge, None if head is None else (self.owner, head)):
            return False
        self.buffered += charge
        return True

    def drop(self, payload_len: int) -> None:
        """A buffered fragment left the buffer."""
        charge = payload_len + ENVELOPE_OVERHEAD
        self.buffered -= charge
        self.budget.release(self.peer, charge)

    def passed(self, next_seq: int) -> None:
        """Delivery moved on to `next_seq`: exceptions held below it are free again."""
        self.budget.release_heads(self.peer, self.owner, next_seq)

    def delivered(self, end: int, payload_len: int) -> None:
        """With flow control: a message ending before `end` went to the application."""
        charge = payload_len + ENVELOPE_OVERHEAD
        self._unconsumed.append((end, charge))
        self.budget.deliver(self.peer, charge)

    def consumed(self, upto: int) -> None:
        """The application took every message ending at or before `upto`."""
        while self._unconsumed and self._unconsumed[0][0] <= upto:
            charge = self._unconsumed.popleft()[1]
            self.released += charge
            self.budget.consume(self.peer, charge)

    def decompression(
        self, declared: int, own: list[int], *, direct: bool, max_message_size: int
    ) -> Decompression:
        """May a message of pieces sized `own` decompress to `declared` bytes now?

        Its pieces leave memory as it is decompressed, so they count as room. A compliant
        publisher compresses nothing larger than an empty budget and, on a direct stream,
        never sends more than the budget behind a message (a topic's may not know of us yet).
        """
        budget = self.budget
        held = sum(own) + len(own) * ENVELOPE_OVERHEAD
        need = declared + ENVELOPE_OVERHEAD
        if declared > min(budget.peer_limit - ENVELOPE_OVERHEAD, max_message_size):
            verdict = Decompression.HOSTILE
        elif need <= budget.room(self.peer) + held:
            verdict = Decompression.FITS
        elif need + self.buffered - held <= budget.peer_limit:
            verdict = Decompression.WAIT
        else:
            verdict = Decompression.HOSTILE if direct else Decompression.NEVER
        if (verdict is Decompression.WAIT) != self.stalled:
            self.stalled = not self.stalled
            if self.stalled:
                budget.stall(self.peer, self.owner)
            else:
                budget.unstall(self.peer, self.owner)
        return verdict

    def close(self) -> None:
        """The owner is dropped: everything it held leaves the budget."""
        budget = self.budget
        budget.release(self.peer, self.buffered)
        budget.consume(self.peer, self.unconsumed_bytes())
        self.buffered = 0
        self._unconsumed.clear()
        budget.release_heads(self.peer, self.owner, math.inf)
        budget.unstall(self.peer, self.owner)


def _subtract(counts: dict[str, int], key: str, n: int) -> None:
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _passed(head: Hashable | None, owner: object, below: float) -> bool:
    return isinstance(head, tuple) and head[0] is owner and head[1] < below


class SendLedger:
    """Publisher-side totals over all streams: unacked sequence numbers, bytes per receiver."""

    def __init__(self, peer_limit: int) -> None:
        self.peer_limit = peer_limit
        self.unacked = 0
        self._held: dict[str, int] = {}

    def held(self, peer: str) -> int:
        """What `peer` may hold of ours now, as far as we know."""
        return self._held.get(peer, 0)

    def fits(self, peer: str, cost: int) -> bool:
        """Whether `peer` can take a message of `cost`: always when it holds nothing of ours."""
        held = self.held(peer)
        return held == 0 or held + cost <= self.peer_limit

    def add(self, peer: str, cost: int) -> None:
        """A message of `cost` went to `peer`."""
        self._held[peer] = self.held(peer) + cost

    def remove(self, peer: str, cost: int) -> None:
        """`peer` consumed (or will never hold) a message of `cost`."""
        left = self.held(peer) - cost
        if left > 0:
            self._held[peer] = left
        else:
            self._held.pop(peer, None)
