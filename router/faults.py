"""Fault injection between the protocol and libp2p: our netem, for tests and chaos runs.

The kernel here has no netem, so faults are injected on the frames the engine hands to, and
receives from, libp2p. Configured by a string such as
`drop=0.1,duplicate=0.05,reorder=0.1,corrupt=0.01,delay=0.002,seed=7` (environment
variable `P2PR_FAULTS` for node processes).
"""

from __future__ import annotations

import random

import attrs

FAULTS_ENV = "P2PR_FAULTS"


@attrs.frozen
class FaultConfig:
    """Per-frame probabilities and delays (seconds) applied to inbound frames."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # probability of holding a frame back by up to reorder_delay
    corrupt: float = 0.0  # probability of overwriting 1-3 bytes of a frame
    delay: float = 0.0
    reorder_delay: float = 0.02
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultConfig:
        """Parse `key=value,...`; unknown keys or bad values raise ValueError."""
        values: dict[str, float | int] = {}
        fields = {f.name: f.type for f in attrs.fields(cls)}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = {"dup": "duplicate"}.get(key.strip(), key.strip())
            if not sep or key not in fields:
                raise ValueError(f"bad fault setting {part!r}; known: {', '.join(fields)}")
            values[key] = int(value) if key == "seed" else float(value)
        config = cls(**values)  # type: ignore[arg-type]
        for name in ("drop", "duplicate", "reorder", "corrupt"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")
        return config

    @property
    def active(self) -> bool:
        """Whether any fault is configured."""
        return any((self.drop, self.duplicate, self.reorder, self.corrupt, self.delay))


@attrs.define
class FaultStats:
    """What the shim did."""

    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    partitioned: int = 0
    # Per sending peer, so a test can check that rejections are counted against the right link.
    corrupted_from: dict[str, int] = attrs.Factory(dict)


class FaultShim:
    """Decides, per inbound frame, what the protocol gets: nothing, the frame, or two copies,
    each after a delay and perhaps damaged. Peers in `partitioned` are cut both ways.

    Damage is done in `damage`, as a copy is handed to the protocol, not when it is held
    back: a frame still waiting out its delay is counted neither here nor by the protocol,
    so the shim's `corrupted` and the protocol's rejections, read together, agree."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = config or FaultConfig()
        self.rng = random.Random(self.config.seed)
        self.stats = FaultStats()
        self.partitioned: set[str] = set()

    def blocks(self, peer: str) -> bool:
        """Whether frames to or from `peer` are cut by a partition."""
        return peer in self.partitioned

    def inbound(self, data: bytes, peer: str) -> list[tuple[float, bytes]]:
        """(delay, frame) pairs for one frame from `peer`; each goes through `damage` when
        its delay is over."""
        cfg, rng = self.config, self.rng
        self.stats.frames += 1
        if peer in self.partitioned:
            self.stats.partitioned += 1
            return []
        if not cfg.active:
            return [(0.0, data)]
        if rng.random() < cfg.drop:
            self.stats.dropped += 1
            return []
        copies = 1
        if rng.random() < cfg.duplicate:
            copies = 2
            self.stats.duplicated += 1
        out = []
        for _ in range(copies):
            delay = cfg.delay
            if rng.random() < cfg.reorder:
                delay += rng.uniform(0.0, cfg.reorder_delay)
                self.stats.reordered += 1
            out.append((delay, data))
        return out

    def damage(self, frame: bytes, peer: str) -> bytes:
        """`frame` from `peer` as the protocol gets it: with probability `corrupt`, 1-3 bytes
        overwritten."""
        rng = self.rng
        if not (frame and self.config.corrupt) or rng.random() >= self.config.corrupt:
            return frame
        damaged = bytearray(frame)
        # Distinct positions, so that two flips never cancel out: a counted frame is damaged.
        for at in rng.sample(range(len(damaged)), min(len(damaged), rng.randint(1, 3))):
            damaged[at] ^= rng.randint(1, 255)
        self.stats.corrupted += 1
        self.stats.corrupted_from[peer] = self.stats.corrupted_from.get(peer, 0) + 1
        return bytes(damaged)
