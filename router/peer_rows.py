"""What an engine reports about its peers: health rows (`Router.health`), their states, the
counters (`Router.counters`), where each peer listens, and the liveness detector's input.

Everything here reads engine state: call it on the engine's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from libp2p.abc import IHost
from libp2p.peer.id import ID

from p2p_reliable import Endpoint, PeerState

from .faults import FaultShim
from .membership import Membership

__all__ = ["PeerReport"]


class PeerReport:
    """Reads an engine's endpoint, connections and memberships into JSON-ready rows.

    Args:
        endpoint: the engine's protocol endpoint.
        connected: peer -> the address of its connection (the engine's own dict).
        membership: what peers' hellos said.
        shim: the engine's fault shim (its counters).
        host: the engine's libp2p host, once it runs.
        now: the engine's clock.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        connected: dict[str, str],
        membership: Membership,
        shim: FaultShim,
        host: Callable[[], IHost | None],
        now: Callable[[], float],
    ) -> None:
        self.endpoint = endpoint
        self.connected = connected
        self._membership = membership
        self.shim = shim
        self._host = host
        self._now = now

    def liveness_input(self) -> tuple[dict[str, float | None], set[str]]:
        """When each connected peer was last heard, and those whose health says dead or
        unknown (`router/liveness.py` judges them)."""
        now = self._now()
        heard = {p: self.endpoint.health(p).last_seen for p in self.connected}
        # UNKNOWN: connected, but no heartbeat since (a peer that hangs right after it
        # connects is found by its silence too).
        quiet = (PeerState.DEAD, PeerState.UNKNOWN)
        dead = {p for p in heard if self.endpoint.health(p).state(now) in quiet}
        return heard, dead

    def health_view(self) -> list[dict[str, Any]]:
        """Every known peer's health, JSON-friendly (call on the engine's loop)."""
        now = self._now()
        twins = set(self.endpoint.duplicate_origins(now))
        out = []
        for snapshot in self.endpoint.healths.snapshots(now):
            row = snapshot.to_dict()
            if snapshot.last_seen is not None:
                row["last_seen_s_ago"] = round(now - snapshot.last_seen, 3)
            row["address"] = self.connected.get(snapshot.peer)
            row["connected"] = snapshot.peer in self.connected
            row["listen_addrs"] = self.listen_addrs_of(snapshot.peer)
            row["duplicate"] = snapshot.peer in twins
            # First-hand: the peer's own hello said it only watches.
            row["observer"] = self._membership.is_observer(snapshot.peer)
            out.append(row)
        return out

    def counters(self) -> dict[str, Any]:
        """The protocol's counters, the fault shim's, and every peer's health row (with
        `shim_corrupted`: frames from that peer the shim damaged), JSON-ready (call on the
        engine's loop)."""
        shim = attrs.asdict(self.shim.stats)
        # Kept flat (name -> count); what the shim damaged per sender goes in that peer's row.
        corrupted_from = shim.pop("corrupted_from")
        peers = {}
        for snapshot in self.endpoint.healths.snapshots(self._now()):
            row = snapshot.to_dict()
            row["shim_corrupted"] = corrupted_from.get(snapshot.peer, 0)
            peers[snapshot.peer] = row
        return {"protocol": self.endpoint.stats.as_dict(), "shim": shim, "peers": peers}

    def health_states(self) -> dict[str, str]:
        """Every known peer's state name, as in `health_view` (call on the engine's loop)."""
        return {
            peer: state.name for peer, state in self.endpoint.healths.states(self._now()).items()
        }

    def listen_addrs_of(self, peer: str) -> list[str]:
        # Identify fills the peerstore with the addresses a peer listens on: what others need
        # to reach it (a connection's own address may be an ephemeral outgoing port).
        host = self._host()
        if host is None:
            return []
        try:
            addrs = host.get_peerstore().addrs(ID.from_base58(peer))
        except Exception:
            return []
        out = []
        for addr in addrs:
            text = str(addr)
            out.append(text if "/p2p/" in text else f"{text}/p2p/{peer}")
        return out
