"""Counting refused input per (peer, kind), in bounded memory.

Every layer that refuses input from a peer counts it here (the protocol counts its own in
the peer's health). A flood of distinct peer ids cannot grow the table beyond `max_keys`:
past that, counts go to the peer id "(other)".
"""

from __future__ import annotations

OTHER = "(other)"


class RejectionCounter(dict[tuple[str, str], int]):
    """(peer, kind) -> count, at most `max_keys` keys."""

    def __init__(self, max_keys: int = 4096) -> None:
        super().__init__()
        self.max_keys = max_keys

    def count(self, peer: str, kind: str, n: int = 1) -> int:
        """Add `n` refusals of `kind` from `peer`; the peer's total of that kind."""
        key = (peer, kind)
        if key not in self and len(self) >= self.max_keys:
            key = (OTHER, kind)
        self[key] = self.get(key, 0) + n
        return self[key]

    def of(self, peer: str) -> int:
        """Everything refused from `peer`, all kinds."""
        return sum(n for (p, _), n in self.items() if p == peer)
