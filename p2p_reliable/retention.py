"""A stream's message log: messages still owed to receivers, then a bounded retained history.

A topic stream keeps every message for `retain_seconds` after publication, even once every
receiver has it, so that a subscriber the publisher learns of late can still be served from
the moment it subscribed. What falls out of retention is remembered as a few eviction marks
(first sequence number of a run, newest publish time in it) that SYNC carries, so that such a
subscriber can tell what it was owed and lost from what was published before it joined.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs

from .control import MAX_EVICTION_MARKS, EvictionMark


@attrs.define(slots=True)
class Fragment:
    """One sequence number's encoded envelope, as it is (re)transmitted."""

    msg_start: int
    data: bytes
    size: int


@attrs.define(slots=True)
class LoggedMessage:
    """A message of the log; `owed` counts the receivers still waiting for (part of) it.

    `size` is the encoded bytes held for it, which the retention bounds count.
    """

    start: int
    count: int
    size: int
    published: float
    owed: int


@attrs.frozen
class RetentionLimits:
    """How much of a stream's settled history is kept, and for how long."""

    seconds: float
    messages: int
    bytes: int


NO_RETENTION = RetentionLimits(seconds=0.0, messages=0, bytes=0)


class EvictionHistory:
    """Runs of evicted messages as (first seq, newest publish time), at most `limit` of them.

    Mark i covers the sequence numbers from its seq to the next mark's (the last one up to the
    log's floor), and its time is at least the publish time of every message it covers: a
    merged run may be reported lost a bit too widely, never too narrowly.
    """

    def __init__(self, limit: int = MAX_EVICTION_MARKS) -> None:
        self.limit = limit
        self._marks: list[tuple[int, float]] = []

    def __len__(self) -> int:
        return len(self._marks)

    def entries(self) -> list[tuple[int, float]]:
        """The marks as (first seq, publish time), oldest first."""
        return list(self._marks)

    def note(self, start: int, published: float) -> None:
        """The message starting at `start` (above every earlier one) was evicted."""
        if self._marks:
            # Times must not decrease along the log (receivers rely on it): a caller's clock
            # that went backwards is rounded up, which only widens what is reported lost.
            published = max(published, self._marks[-1][1])
        self._marks.append((start, published))
        if len(self._marks) > self.limit:
            self._merge_closest()

    def _merge_closest(self) -> None:
        # Merging the two runs closest in time loses the least precision wherever the history
        # is dense; merging always the oldest would squeeze everything but the last few
        # evictions into one run and report far too much lost to a subscriber late by seconds.
        marks = self._marks
        best = min(range(len(marks) - 1), key=lambda i: marks[i + 1][1] - marks[i][1])
        marks[best : best + 2] = [(marks[best][0], marks[best + 1][1])]

    def marks(self, now: float) -> list[EvictionMark]:
        """The marks with their age in whole microseconds at `now`, for a SYNC."""
        return [EvictionMark(seq, max(0, int((now - t) * 1e6))) for seq, t in self._marks]


class RetentionBudget:
    """Retained bytes over all topic streams of one endpoint, evicted oldest first past `cap`."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.bytes = 0
        self.members: list[MessageLog] = []

    def enforce(self) -> None:
        """Evict the globally oldest retained messages until the total fits the cap."""
        while self.bytes > self.cap:
            oldest = min(
                (log for log in self.members if log.retained_bytes),
                key=lambda log: log.head_published(),
            )
            oldest.evict_head()


class MessageLog:
    """Messages in sequence order: a retained prefix that nobody waits for, then the rest.

    Only the settled prefix (before the first message some receiver still waits for) counts as
    retained and is bounded by `limits` (and the shared `budget`). From the first owed message
    on, the log holds what receivers wait for (their windows bound it) and what follows until
    that message is acked or given up (the retry span bounds that). Eviction is from the head
    only, so the evicted sequence numbers are exactly those below `floor`.
    """

    def __init__(self, limits: RetentionLimits, budget: RetentionBudget | None = None) -> None:
        self.limits = limits
        self.budget = budget
        self.next_seq = 0
        self.history = EvictionHistory()
        self.retained_bytes = 0
        self.retained_messages = 0
        self._fragments: dict[int, Fragment] = {}
        self._messages: deque[LoggedMessage] = deque()
        self._by_start: dict[int, LoggedMessage] = {}
        self._prefix_stop = 0  # the start of the first message still owed (or next_seq)
        if budget is not None:
            budget.members.append(self)

    @property
    def floor(self) -> int:
        """The oldest sequence number still held."""
        return self._messages[0].start if self._messages else self.next_seq

    def fragment(self, seq: int) -> Fragment | None:
        """The fragment at `seq`, unless it was evicted (or never sent)."""
        return self._fragments.get(seq)

    def message(self, start: int) -> LoggedMessage:
        """The held message starting at `start`."""
        return self._by_start[start]

    def head_published(self) -> float:
        """When the oldest held message was published."""
        return self._messages[0].published

    def append(self, fragments: list[Fragment], published: float, owed: int) -> int:
        """Log a message of `fragments`; return its first sequence number."""
        start = self.next_seq
        for index, frag in enumerate(fragments):
            self._fragments[start + index] = frag
        msg = LoggedMessage(
            start=start,
            count=len(fragments),
            size=sum(len(f.data) for f in fragments),  # what memory holds, headers included
            published=published,
            owed=owed,
        )
        self._messages.append(msg)
        self._by_start[start] = msg
        self.next_seq = start + msg.count
        self._extend_prefix()
        return start

    def settle(self, start: int) -> None:
        """One receiver no longer waits for the message starting at `start`."""
        self._by_start[start].owed -= 1
        self._extend_prefix()

    def _extend_prefix(self) -> None:
        while self._prefix_stop < self.next_seq:
            msg = self._by_start[self._prefix_stop]
            if msg.owed > 0:
                return
            self._prefix_stop = msg.start + msg.count
            self.retained_messages += 1
            self.retained_bytes += msg.size
            if self.budget is not None:
                self.budget.bytes += msg.size

    def evict_due(self, now: float, pinned: Callable[[int], bool]) -> None:
        """Evict what is past the bounds, or older than `retain_seconds` and not `pinned`."""
        limits = self.limits
        while self.retained_messages:
            head = self._messages[0]
            over = self.retained_messages > limits.messages or self.retained_bytes > limits.bytes
            if not over and (now - head.published < limits.seconds or pinned(head.start)):
                break
            self.evict_head()
        if self.budget is not None:
            self.budget.enforce()

    def evict_head(self) -> None:
        """Drop the oldest retained message and remember it in the eviction history."""
        msg = self._messages.popleft()
        del self._by_start[msg.start]
        for seq in range(msg.start, msg.start + msg.count):
            del self._fragments[seq]
        self.retained_messages -= 1
        self.retained_bytes -= msg.size
        if self.budget is not None:
            # Only topic logs (those in a budget) answer late joiners: direct ones never SYNC.
            self.budget.bytes -= msg.size
            self.history.note(msg.start, msg.published)
