"""How peer health is judged: the verdicts and the knobs every tracker of a table shares."""

from __future__ import annotations

import enum

import attrs

__all__ = ["HealthConfig", "PeerState"]


class PeerState(enum.Enum):
    """Liveness verdict for a peer."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    UNKNOWN = "unknown"


@attrs.frozen
class HealthConfig:
    """Tuning knobs shared by every peer in a :class:`HealthTable`."""

    phi_suspect: float = 3.0
    phi_dead: float = 8.0
    phi_window: int = 100
    # With 100 ms heartbeats these put DEAD ~0.45 s into a silence: well inside the 1 s a
    # cluster wants, yet a 200 ms scheduling hiccup of a Python node is not a death.
    min_std: float = 0.05
    acceptable_pause: float = 0.1
    first_interval: float = 0.1
    rtt_alpha: float = 0.125
    rtt_window: int = 256
    rate_window: float = 10.0

    def __attrs_post_init__(self) -> None:
        # Fail at construction: a bad config would otherwise surface as a silently wrong
        # verdict much later.
        if not 0.0 < self.phi_suspect <= self.phi_dead:
            raise ValueError("need 0 < phi_suspect <= phi_dead")
        if self.phi_window < 1 or self.rtt_window < 1:
            raise ValueError("windows must hold at least one sample")
        if not (self.min_std > 0.0 and self.first_interval > 0.0 and self.rate_window > 0.0):
            raise ValueError("min_std, first_interval and rate_window must be positive")
        if not self.acceptable_pause >= 0.0:
            raise ValueError("acceptable_pause must be >= 0")
        if not 0.0 < self.rtt_alpha <= 1.0:
            raise ValueError("rtt_alpha must be in (0, 1]")
