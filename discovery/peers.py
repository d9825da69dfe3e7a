"""Where peers are (bootstrap flags, `P2PR_BOOTSTRAP_PEERS`, a static peers file, mDNS) and
when to dial them: `DialPlanner` is sans-IO, like the protocol core.

exo users hit stale mDNS entries pointing at dead ports after a restart; here an address
that keeps failing is dropped (discovered ones) or retried ever more rarely (configured ones),
and a peer that is connected is never redialed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import multiaddr

BOOTSTRAP_ENV = "P2PR_BOOTSTRAP_PEERS"
CONFIGURED = frozenset({"bootstrap", "static"})


class PeerAddressError(ValueError):
    """A configured peer address is not a usable multiaddr."""


def peer_of(addr: str) -> str:
    """The peer id in a multiaddr ending in /p2p/<id>; PeerAddressError if there is none."""
    try:
        parsed = multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise PeerAddressError(f"{addr!r} is not a multiaddr: {exc}") from None
    try:
        peer = parsed.value_for_protocol("p2p")
    except Exception:
        peer = None
    if not peer:
        raise PeerAddressError(f"{addr!r} has no /p2p/<peer id> part")
    return str(peer)


def parse_addrs(values: Iterable[str]) -> list[str]:
    """Multiaddrs from flags or the environment (comma-separated), validated, deduplicated."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            addr = part.strip()
            if addr and addr not in out:
                peer_of(addr)
                out.append(addr)
    return out


def bootstrap_addrs(flags: Sequence[str] = (), environ: dict[str, str] | None = None) -> list[str]:
    """Bootstrap peers from `--bootstrap` flags and `P2PR_BOOTSTRAP_PEERS`, like exo's
    `EXO_BOOTSTRAP_PEERS`."""
    env = (os.environ if environ is None else environ).get(BOOTSTRAP_ENV, "")
    return parse_addrs([*flags, env])


def read_peers_file(path: str | os.PathLike[str]) -> list[str]:
    """A static peers file: one multiaddr per line; blank lines and `#` comments ignored."""
    lines = Path(path).expanduser().read_text().splitlines()
    wanted = [line.split("#", 1)[0].strip() for line in lines]
    try:
        return parse_addrs(a for a in wanted if a)
    except PeerAddressError as exc:
        raise PeerAddressError(f"{path}: {exc}") from None


@attrs.define
class AddressState:
    """One address and its dialing history."""

    addr: str
    peer: str
    source: str  # "bootstrap", "static" or "mdns"
    failures: int = 0
    next_attempt: float = 0.0
    in_flight: bool = False


class DialPlanner:
    """Decides which addresses to dial and when.

    Failures back off exponentially with full jitter from `base` up to `cap`. An address
    discovered by mDNS that fails `drop_after` times in a row is forgotten (a restarted node
    advertises its new port; the old one is dead). Configured addresses are never forgotten.
    """

    def __init__(
        self,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        drop_after: int = 4,
        seed: int | None = None,
        self_id: str | None = None,
    ) -> None:
        self.base, self.cap, self.drop_after = base, cap, drop_after
        self.rng = random.Random(seed)
        self.self_id = self_id
        self.addresses: dict[str, AddressState] = {}
        self.dropped: list[str] = []

    def add(self, addr: str, source: str, now: float) -> bool:
        """Learn an address; return whether it is new."""
        peer = peer_of(addr)
        if peer == self.self_id:
            return False
        state = self.addresses.get(addr)
        if state is not None:
            if source in CONFIGURED:
                state.source = source
            return False
        self.addresses[addr] = AddressState(addr, peer, source, next_attempt=now)
        return True

    def due(self, now: float, connected: Iterable[str]) -> list[AddressState]:
        """Addresses to dial now (one per unconnected peer), marked in flight."""
        skip = set(connected)
        out = []
        for state in sorted(self.addresses.values(), key=lambda s: (s.failures, s.addr)):
            if state.peer in skip or state.in_flight or state.next_attempt > now:
                continue
            skip.add(state.peer)
            state.in_flight = True
            out.append(state)
        return out

    def on_result(self, addr: str, ok: bool, now: float) -> None:
        """Record the outcome of a dial."""
        state = self.addresses.get(addr)
        if state is None:
            return
        state.in_flight = False
        if ok:
            state.failures = 0
            state.next_attempt = now + self.base
            return
        state.failures += 1
        if state.source not in CONFIGURED and state.failures >= self.drop_after:
            del self.addresses[addr]
            self.dropped.append(addr)
            return
        ceiling = min(self.cap, self.base * 2.0 ** min(state.failures, 30))
        state.next_attempt = now + self.rng.uniform(self.base, max(self.base, ceiling))

    def on_disconnected(self, peer: str, now: float) -> None:
        """A peer went away: its addresses may be dialed again soon."""
        for state in self.addresses.values():
            if state.peer == peer:
                state.next_attempt = min(state.next_attempt, now + self.base)

    def next_time(self, connected: Iterable[str] = ()) -> float | None:
        """When an address of an unconnected peer next becomes due."""
        skip = set(connected)
        times = [
            s.next_attempt
            for s in self.addresses.values()
            if not s.in_flight and s.peer not in skip
        ]
        return min(times) if times else None
