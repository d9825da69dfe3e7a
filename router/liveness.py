"""Finding hung peers: silence, then a probe, then the connection is closed.

A killed process resets its connections and is gone at once. A hung one (SIGSTOP, a stalled
machine) keeps its TCP connections open: nothing is ever read from them again. exo's own
networking pinged every 2.5 s and closed a connection on a failed ping, and exo's election
only starts when it hears that a connection closed. Here phi accrual (the peer's heartbeats)
raises the suspicion and a libp2p ping confirms it:

1. a connected peer whose heartbeats have been missing for `silence` seconds and whose phi
   says DEAD becomes a suspect, and gets one ping;
2. no pong within `probe_timeout`: the engine closes every connection to it (the application
   then hears `connected=False`); a pong clears the suspicion.

A node that was itself stopped (its own loop did not run for a while) sees every peer silent
when it resumes, although the silence was its own: after such a stall nobody is judged until
`silence` seconds of fresh evidence have passed.

Sans-IO: `HangDetector` decides, the engine pings and disconnects.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class LivenessConfig:
    """When a silent peer counts as hung. Defaults find a hung peer within ~2.75 s (silence +
    probe + one check interval) while a live peer on a loaded 2-core machine, whose
    heartbeats (every 100 ms) can be late by a few hundred ms, is never probed, let alone
    disconnected."""

    silence: float = 1.5
    probe_timeout: float = 1.0
    check_interval: float = 0.25
    # A gap this much longer than check_interval between two checks means our own loop
    # stalled (we were stopped, or starved of CPU): the silence we see is ours.
    stall: float = 1.0
    enabled: bool = True

    def __attrs_post_init__(self) -> None:
        if min(self.silence, self.probe_timeout, self.check_interval, self.stall) <= 0:
            raise ValueError("liveness times must be positive")


class HangDetector:
    """Which peers to probe, given when each was last heard from."""

    def __init__(self, config: LivenessConfig) -> None:
        self.config = config
        self._last_check: float | None = None
        self._trust_from = 0.0  # no verdicts on evidence older than this
        self._probing: set[str] = set()
        self.stalls = 0

    def check(self, now: float, last_heard: dict[str, float | None], dead: set[str]) -> list[str]:
        """Peers to probe now. `last_heard`: every connected peer and when anything last came
        from it (None: never); `dead`: those phi accrual calls dead."""
        cfg = self.config
        if self._last_check is not None and now - self._last_check > cfg.check_interval + cfg.stall:
            self.stalls += 1
            self._trust_from = now
        self._last_check = now
        if not cfg.enabled or now - self._trust_from < cfg.silence:
            return []
        out = []
        for peer, heard in sorted(last_heard.items()):
            if peer in self._probing or peer not in dead:
                continue
            since = max(heard if heard is not None else -float("inf"), self._trust_from)
            if now - since >= cfg.silence:
                self._probing.add(peer)
                out.append(peer)
        return out

    def probe_done(self, peer: str) -> None:
        """The probe of `peer` ended (answered, failed, or the peer left)."""
        self._probing.discard(peer)

    def probing(self) -> frozenset[str]:
        """Peers with a probe in flight."""
        return frozenset(self._probing)
