"""Stop strings over streamed text: what may be shown now, and where generation must end.

Text arrives piece by piece (each token's detokenized text). A stop string may be split over
several pieces, so the scanner holds back the longest tail of the text that could still be
the start of a stop string; everything before it is safe to show. Once a stop string is
complete, the text before it is released, the stop string and anything after it are not.

Invariant: no stop string can begin inside text already released (the held-back tail is the
longest suffix that is a prefix of a stop string), so every match lies in the held text.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

__all__ = ["StopScan", "StopScanner"]


@attrs.frozen
class StopScan:
    """The result of feeding one piece: `text` may be shown; `stopped`: a stop string ended
    the generation (nothing after `text` is to be shown)."""

    text: str
    stopped: bool


class StopScanner:
    """Finds stop strings in streamed text (see the module docstring)."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> StopScan:
        """Take the next piece of text; return what may be shown now."""
        if self.stopped:
            raise RuntimeError("the scanner already found a stop string")
        held = self._held + piece
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return StopScan(held[: min(found)], True)
        keep = self._open_prefix(held)
        self._held = held[len(held) - keep :] if keep else ""
        return StopScan(held[: len(held) - keep], False)

    def flush(self) -> str:
        """At the end of generation: the held-back text (it did not become a stop string)."""
        held, self._held = self._held, ""
        return held

    def _open_prefix(self, text: str) -> int:
        """The length of the longest suffix of `text` that is a proper prefix of a stop."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
