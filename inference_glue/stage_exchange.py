"""Peer exchange for stage nodes: a client finds stage nodes through the others' health views.

A stage node restarted with the address of any one survivor connects to that survivor only.
Every stage node publishes its health view on `p2pr/health` (`discovery.share`): its own
addresses and, per peer, where that peer listens. `StageExchange` reads those views for a
client and dials the stage nodes (and their non-observer peers) it is not connected to; the
client then asks them what they serve (`Roster`) and plans them in between requests.

A client with a whole pipeline does not need the views (and would be sent every stage's view
every second), so it follows them from the first node it loses on (`follow`). The views are
kept (`views`): they also say whether any node reports a duplicate identity.

Views come from the network: malformed ones are counted and dropped, addresses are bounded in
length and number.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection

import anyio

from discovery.health import HEALTH_TOPIC, ClusterViews, HealthView
from router import Router

__all__ = ["MAX_EXCHANGED_ADDRS", "StageExchange"]

# Addresses learned from views that one client dials at most (a hostile view could list any
# number), and the longest address taken.
MAX_EXCHANGED_ADDRS = 4096
MAX_ADDR_LEN = 512


class StageExchange:
    """Follows the stage nodes' health views for a client and dials the stage nodes they name.

    Args:
        router: the client's running router.
        skip: peers not to dial (connected ones are skipped anyway), e.g. quarantined nodes.
        heard: called after each view with whether it came from a stage node.
    """

    def __init__(
        self,
        router: Router,
        skip: Callable[[], Collection[str]],
        heard: Callable[[HealthView], None],
    ) -> None:
        self.router = router
        self.views = ClusterViews(router.node_id, uuid.uuid4().hex)
        self.bad_views = 0
        self._skip = skip
        self._heard = heard
        self._due = anyio.Event()
        self._dialed: set[str] = set()

    def follow(self) -> None:
        """Start following the views (once; later calls do nothing)."""
        self._due.set()

    async def run(self) -> None:
        """Wait for `follow`, then subscribe to the views and act on them until cancelled."""
        await self._due.wait()
        await self.router.register_topic(HEALTH_TOPIC)
        async for view in self.router.receiver(HEALTH_TOPIC):
            if not plausible(view):
                self.bad_views += 1
                continue
            self.views.add(view)
            if view.role == "stage" and view.node_id != self.router.node_id:
                self._dial(exchanged_addrs(view, set(self.router.connected) | set(self._skip())))
            self._heard(view)

    def _dial(self, addrs: list[str]) -> None:
        for addr in addrs:
            if addr not in self._dialed and len(self._dialed) < MAX_EXCHANGED_ADDRS:
                self._dialed.add(addr)
                self.router.add_peer_addr(addr, "exchange")


def plausible(view: HealthView) -> bool:
    """Whether a view from the network has the field types that `ClusterViews` relies on."""
    return (
        isinstance(view.node_id, str)
        and isinstance(view.instance, str)
        and isinstance(view.role, str)
        and type(view.sent_at) in (int, float)
        and isinstance(view.addrs, list)
        and all(isinstance(a, str) for a in view.addrs)
        and isinstance(view.peers, list)
        and isinstance(view.duplicates, list)
        and all(isinstance(d, str) for d in view.duplicates)
        and all(isinstance(r, dict) and isinstance(r.get("peer"), str) for r in view.peers)
    )


def exchanged_addrs(view: HealthView, skip: set[str]) -> list[str]:
    """Where a (plausible) stage node's view says stage nodes listen: its own addresses and
    its peers' (not observers', not those in `skip`)."""
    out: list[str] = []
    if view.node_id not in skip:
        out += view.addrs
    for row in view.peers:
        if not row.get("observer") and row["peer"] not in skip:
            addrs = row.get("listen_addrs")
            out += addrs if isinstance(addrs, list) else []
    return [a for a in out if isinstance(a, str) and len(a) <= MAX_ADDR_LEN]
