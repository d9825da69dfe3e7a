"""What becomes of refused input: counted per (peer, kind), logged (rate-limited), and held
against the peer, which is cut off when it keeps at it (`router/penalty.py` decides when).

Sans-IO: `Refusals` counts and decides; the engine closes the connections it is told to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from p2p_reliable import Rejected

from .penalty import PenaltyBox, PenaltyConfig
from .ratelog import RateLimitedLog
from .rejections import RejectionCounter

__all__ = ["NOT_HOSTILE", "Refusals"]

log = logging.getLogger("p2pr.engine")

# Refusals an honest peer can cause: damaged envelopes (what a bad link or the fault shim
# does) and our own total stream cap. They are counted (the peer's health) but never count
# towards cutting the peer off.
NOT_HOSTILE = ("checksum", "too many inbound streams")


class Refusals:
    """Counts refused input and says which peers to cut off.

    Args:
        config: when a peer is cut off, and for how long.
        now: the clock (the engine's).
        cut_off: called with (peer, why) when a peer must be disconnected now.
    """

    def __init__(
        self,
        config: PenaltyConfig,
        now: Callable[[], float],
        cut_off: Callable[[str, str], None],
    ) -> None:
        self.config = config
        self.counts = RejectionCounter()
        self.penalties = PenaltyBox(config)
        self._now = now
        self._cut_off = cut_off
        self._log = RateLimitedLog(log)

    def reject(self, peer: str, kind: str) -> None:
        """Input of `kind` from `peer` was refused: count it, log it (rate-limited), and cut
        the peer off if it keeps at it."""
        total = self.counts.count(peer, kind)
        self._log.warning(peer, kind, "refused input from %s: %s (%d so far)", peer, kind, total)
        self.penalize(peer, kind)

    def penalize(self, peer: str, kind: str) -> None:
        """One more refusal of `peer`'s input (counted elsewhere): cut it off if it keeps
        at it."""
        if self.penalties.bad(peer, self._now()):
            cfg = self.config
            self._cut_off(peer, f"{kind} and more: over {cfg.max_bad} refusals in {cfg.window:g} s")

    def rejected_envelope(self, event: Rejected) -> None:
        """The protocol refused an envelope (and counted it in the peer's health, where
        /metrics reads it from); here it only counts towards cutting the peer off."""
        self._log.warning(event.peer, event.reason, "%s", event)
        if event.reason.startswith(NOT_HOSTILE):
            return
        if self.penalties.bad(event.peer, self._now()):
            self._cut_off(event.peer, f"{event.reason} and more")

    def banned(self, peer: str) -> bool:
        """Whether `peer` is cut off now (new connections from it are closed at once)."""
        return self.penalties.banned(peer, self._now())
