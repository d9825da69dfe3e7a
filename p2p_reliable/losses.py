"""What a receiver gave up, and why: the holes its delivery passes with a Gap, or silently."""

from __future__ import annotations

from .rangeset import RangeSet

NOT_REPAIRED = "publisher could not repair"
EVICTED = "fell out of the publisher's retention before it learned of this subscriber"
TIMED_OUT = "not repaired within gap_timeout (publisher unreachable)"
NOT_OWED = None  # published before we were owed it: passed without a Gap

Reason = str | None


class Losses:
    """Sequence numbers given up, each with the reason its Gap will give.

    A reason given for a sequence number first stays: the more specific reasons (not owed,
    evicted, timed out) are looked up in that order, anything else is NOT_REPAIRED.
    """

    _ORDER: tuple[Reason, ...] = (NOT_OWED, EVICTED, TIMED_OUT)

    def __init__(self) -> None:
        self.all = RangeSet()
        self._by_reason: dict[Reason, RangeSet] = {r: RangeSet() for r in self._ORDER}

    def __contains__(self, seq: int) -> bool:
        return seq in self.all

    def add(self, ranges: RangeSet, reason: Reason) -> None:
        """Give up `ranges` for `reason`."""
        specific = self._by_reason.get(reason)
        for r in ranges:
            self.all.add(r.start, r.stop)
            if specific is not None:
                specific.add(r.start, r.stop)

    def run_at(self, seq: int, held: RangeSet) -> tuple[int, Reason]:
        """Where the lost run starting at `seq` ends (at what is held or another reason)."""
        stop = next(r.stop for r in self.all if seq in r)
        stop = min([stop, *(r.start for r in held if r.start > seq)])
        reason: Reason = NOT_REPAIRED
        found = False
        for why in self._ORDER:
            for r in self._by_reason[why]:
                if seq in r and not found:
                    found, reason, stop = True, why, min(stop, r.stop)
                elif r.start > seq:
                    stop = min(stop, r.start)
        return stop, reason

    def forget_below(self, stop: int) -> None:
        """Delivery passed `stop`: nothing below is asked for again, so keep the sets small."""
        self.all.subtract(0, stop)
        for ranges in self._by_reason.values():
            ranges.subtract(0, stop)
