"""The earliest deadline over many state machines without scanning them all on every call.

The endpoint marks a machine `touched` whenever it calls into it (its deadline can only change
then); `earliest()` re-reads just those and keeps the rest in a heap. Stale heap entries are
skipped when they surface and compacted away when they outnumber the live ones, so memory and
time stay proportional to the machines that exist and the calls made.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, Protocol, TypeVar


class Timed(Protocol):
    """A state machine with one next deadline."""

    def next_timer(self) -> float | None: ...


M = TypeVar("M", bound=Timed)


class TimerQueue(Generic[M]):
    """Deadlines of machines, refreshed only for those touched since the last look."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, M]] = []
        self._due: dict[M, tuple[float, int]] = {}
        self._touched: dict[M, None] = {}  # insertion-ordered set
        self._order = itertools.count()
        self.reads = 0  # next_timer() calls made: the cost tests can count

    def touch(self, machine: M) -> None:
        """`machine` was called into: its deadline may have changed."""
        self._touched[machine] = None

    def forget(self, machine: M) -> None:
        """`machine` is gone: it has no deadline any more."""
        self._touched.pop(machine, None)
        self._due.pop(machine, None)

    def earliest(self) -> float | None:
        """The earliest deadline over all machines."""
        self._refresh()
        while self._heap:
            deadline, order, machine = self._heap[0]
            if self._due.get(machine) == (deadline, order):
                return deadline
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float) -> list[M]:
        """The machines whose deadline is at or before `now` (touched: they will run)."""
        self._refresh()
        out: list[M] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, order, machine = heapq.heappop(self._heap)
            if self._due.get(machine) == (deadline, order):
                del self._due[machine]
                out.append(machine)
                self._touched[machine] = None
        return out

    def _refresh(self) -> None:
        for machine in self._touched:
            self.reads += 1
            deadline = machine.next_timer()
            current = self._due.get(machine)
            if deadline is None:
                self._due.pop(machine, None)
            elif current is None or current[0] != deadline:
                entry = (deadline, next(self._order))
                self._due[machine] = entry
                heapq.heappush(self._heap, (*entry, machine))
        self._touched.clear()
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(d, o, m) for m, (d, o) in self._due.items()]
            heapq.heapify(self._heap)
