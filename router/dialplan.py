"""Which addresses to dial and when: `DialPlanner` is sans-IO, like the protocol core.

exo users hit stale mDNS entries pointing at dead ports after a restart; here an address
that keeps failing is dropped (discovered ones) or retried ever more rarely (configured ones),
and a peer that is connected is never redialed. Addresses are TCP multiaddrs, with or without
`/p2p/<peer id>` (`peer_in`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable

import attrs
import multiaddr

__all__ = [
    "CONFIGURED",
    "DROP_AFTER",
    "AddressState",
    "DialPlanner",
    "PeerAddressError",
    "peer_in",
    "peer_of",
]

CONFIGURED = frozenset({"bootstrap", "static"})
# Failures in a row after which an address of each kind is forgotten (configured: never).
# An address another node told us of is tried once: a lie costs one dial. One found by mDNS
# is tried a few times (a node restarting there). One of a peer that we cut as hung is tried
# while it may still come back.
DROP_AFTER = {"exchange": 1, "mdns": 4, "returning": 6}


class PeerAddressError(ValueError):
    """A configured peer address is not a usable multiaddr."""


_NETWORK_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")


def peer_in(addr: str) -> str | None:
    """The peer id of a dialable TCP multiaddr, or None when it has no /p2p/<id> part (the
    id is then learned from the handshake, as exo's networking allowed).

    Raises PeerAddressError for anything that is not `/<ip4|ip6|dns…>/H/tcp/P[/p2p/ID]`.
    """
    try:
        parsed = multiaddr.Multiaddr(addr)
        names = [p.name for p in parsed.protocols()]
    except Exception as exc:
        raise PeerAddressError(f"{addr!r} is not a multiaddr: {exc}") from None
    if len(names) < 2 or names[0] not in _NETWORK_PROTOCOLS or names[1] != "tcp":
        raise PeerAddressError(f"{addr!r} is not /ip4/ADDRESS/tcp/PORT[/p2p/PEER_ID]")
    if names[2:] not in ([], ["p2p"]):
        raise PeerAddressError(f"{addr!r}: only /p2p/<peer id> may follow the TCP port")
    if not names[2:]:
        return None
    try:
        return str(parsed.value_for_protocol("p2p"))
    except Exception as exc:
        raise PeerAddressError(f"{addr!r} has a bad /p2p/ part: {exc}") from None


def peer_of(addr: str) -> str:
    """The peer id in a multiaddr ending in /p2p/<id>; PeerAddressError if there is none."""
    peer = peer_in(addr)
    if peer is None:
        raise PeerAddressError(f"{addr!r} has no /p2p/<peer id> part")
    return peer


@attrs.define
class AddressState:
    """One address and its dialing history."""

    addr: str
    peer: str | None  # None until a handshake at an address given without /p2p/ tells it
    source: str  # "bootstrap", "static", "mdns" or "exchange"
    failures: int = 0
    next_attempt: float = 0.0
    in_flight: bool = False
    bare: bool = False  # given without /p2p/: whoever answers there is the peer


class DialPlanner:
    """Decides which addresses to dial and when.

    Failures back off exponentially with full jitter from `base` up to `cap`. An address
    discovered by mDNS that fails `drop_after` times in a row is forgotten (a restarted node
    advertises its new port; the old one is dead), one learned by peer exchange after one
    failure (see DROP_AFTER). Configured addresses are never forgotten. At most
    `max_addresses` are kept: beyond that, new unconfigured ones are refused.
    """

    def __init__(
        self,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        drop_after: int = 4,
        seed: int | None = None,
        self_id: str | None = None,
        max_addresses: int = 512,
    ) -> None:
        self.base, self.cap = base, cap
        self.drop_after = {**DROP_AFTER, "mdns": drop_after}
        self.rng = random.Random(seed)
        self.self_id = self_id
        self.addresses: dict[str, AddressState] = {}
        self.dropped: deque[str] = deque(maxlen=256)
        self.max_addresses = max_addresses
        self.refused = 0

    def add(self, addr: str, source: str, now: float) -> bool:
        """Learn an address; return whether it is new. PeerAddressError if it is not one."""
        peer = peer_in(addr)
        if peer is not None and peer == self.self_id:
            return False
        state = self.addresses.get(addr)
        if state is not None:
            if source in CONFIGURED:
                state.source = source
            return False
        if source not in CONFIGURED and len(self.addresses) >= self.max_addresses:
            self.refused += 1
            return False
        self.addresses[addr] = AddressState(addr, peer, source, next_attempt=now, bare=peer is None)
        return True

    def due(self, now: float, connected: Iterable[str]) -> list[AddressState]:
        """Addresses to dial now (one per unconnected peer), marked in flight."""
        skip = set(connected)
        out = []
        for state in sorted(self.addresses.values(), key=lambda s: (s.failures, s.addr)):
            if state.peer in skip or state.in_flight or state.next_attempt > now:
                continue
            if state.peer is not None:
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
        if state.bare:
            state.peer = None  # another node may listen there now (a restart, a new key)
        limit = self.drop_after.get(state.source, 1)
        if state.source not in CONFIGURED and state.failures >= limit:
            del self.addresses[addr]
            self.dropped.append(addr)
            return
        ceiling = min(self.cap, self.base * 2.0 ** min(state.failures, 30))
        state.next_attempt = now + self.rng.uniform(self.base, max(self.base, ceiling))

    def learned(self, addr: str, peer: str) -> None:
        """A handshake at `addr` (given without /p2p/) met `peer`; forget `addr` if that is
        this node itself (a bootstrap list that names every node, us included)."""
        state = self.addresses.get(addr)
        if state is None:
            return
        if peer == self.self_id:
            del self.addresses[addr]
        else:
            state.peer = peer

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
