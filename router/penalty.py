"""Peers that keep sending bad input are cut off for a while.

One bad frame is counted and dropped. A peer that keeps at it (more than `max_bad` refusals
within `window` seconds) is disconnected and, for `ban` seconds, every new connection from
it is closed at once: the flood costs the attacker its connection, not the node its CPU.
Damaged envelopes (checksum failures) are not held against a peer: they are what a bad link
does, and the fault-injection shim produces them on purpose.

Sans-IO: `PenaltyBox` counts and decides; the engine disconnects.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import attrs


@attrs.frozen
class PenaltyConfig:
    """When a misbehaving peer is cut off, and for how long."""

    max_bad: int = 200
    window: float = 10.0
    ban: float = 60.0
    max_peers: int = 4096  # peers tracked at once (oldest forgotten first)


class PenaltyBox:
    """Counts refusals per peer in a sliding window; says who to cut off."""

    def __init__(self, config: PenaltyConfig | None = None) -> None:
        self.config = config or PenaltyConfig()
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned: dict[str, float] = {}
        self.bans = 0

    def bad(self, peer: str, now: float) -> bool:
        """`peer` sent something refused at `now`; True when it must be cut off now."""
        cfg = self.config
        times = self._recent.get(peer)
        if times is None:
            times = self._recent[peer] = deque(maxlen=cfg.max_bad + 1)
            while len(self._recent) > cfg.max_peers:
                self._recent.popitem(last=False)
        self._recent.move_to_end(peer)
        times.append(now)
        while times and times[0] < now - cfg.window:
            times.popleft()
        if len(times) > cfg.max_bad and not self.banned(peer, now):
            self._banned[peer] = now + cfg.ban
            times.clear()
            self.bans += 1
            return True
        return False

    def banned(self, peer: str, now: float) -> bool:
        """Whether connections from `peer` are refused at `now`."""
        until = self._banned.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._banned[peer]
            return False
        return True
