"""Sets of integers kept as sorted, disjoint, half-open ranges (as in aioquic's rangeset)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class RangeSet:
    """Sorted, non-overlapping, non-adjacent half-open ranges of integers.

    Sequence numbers received, acked or abandoned are stored this way so that a million
    consecutive numbers cost one entry.
    """

    __slots__ = ("_ranges",)

    def __init__(self, ranges: Iterable[range] = ()) -> None:
        self._ranges: list[range] = []
        for r in ranges:
            self.add(r.start, r.stop)

    def add(self, start: int, stop: int | None = None) -> None:
        """Add `start` alone, or the half-open range [start, stop)."""
        if stop is None:
            stop = start + 1
        if stop <= start:
            return
        ranges = self._ranges
        # Skip ranges ending before `start`: the first one left is the first that can touch.
        i = 0
        while i < len(ranges) and ranges[i].stop < start:
            i += 1
        j = i
        while j < len(ranges) and ranges[j].start <= stop:
            start = min(start, ranges[j].start)
            stop = max(stop, ranges[j].stop)
            j += 1
        ranges[i:j] = [range(start, stop)]

    def subtract(self, start: int, stop: int) -> None:
        """Remove the half-open range [start, stop)."""
        if stop <= start:
            return
        out: list[range] = []
        for r in self._ranges:
            if r.stop <= start or r.start >= stop:
                out.append(r)
                continue
            if r.start < start:
                out.append(range(r.start, start))
            if r.stop > stop:
                out.append(range(stop, r.stop))
        self._ranges = out

    def shift(self) -> range:
        """Remove and return the lowest range."""
        return self._ranges.pop(0)

    def bounds(self) -> range:
        """The smallest range covering every member (the set must not be empty)."""
        return range(self._ranges[0].start, self._ranges[-1].stop)

    def count(self) -> int:
        """Number of integers in the set."""
        return sum(r.stop - r.start for r in self._ranges)

    def missing(self, start: int, stop: int) -> RangeSet:
        """The parts of [start, stop) not in this set."""
        out = RangeSet()
        cursor = start
        for r in self._ranges:
            if r.stop <= cursor:
                continue
            if r.start >= stop:
                break
            if r.start > cursor:
                out._ranges.append(range(cursor, r.start))
            cursor = max(cursor, r.stop)
        if cursor < stop:
            out._ranges.append(range(cursor, stop))
        return out

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        for r in self._ranges:
            if value < r.start:
                return False
            if value < r.stop:
                return True
        return False

    def __getitem__(self, index: int) -> range:
        return self._ranges[index]

    def __len__(self) -> int:
        return len(self._ranges)

    def __iter__(self) -> Iterator[range]:
        return iter(self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(tuple(self._ranges))

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges!r})"
