"""Peer exchange for stage nodes: a client finds stage nodes through the others' health views.

A stage node restarted with the address of any one survivor connects to that survivor only.
Every stage node publishes its health view on `p2pr/health` (`discovery.share`): its own
addresses and, per peer, where that peer listens. `StageExchange` reads those views for a
client and dials the stage nodes (and their non-observer peers) it is not connected to; the
client then asks them what they serve (`Roster`) and plans them in between requests.

A client with a whole pipeline does not need the views (and would be sent every stage's view
every second), so it follows them from the first node it loses on (`follow`). The views are
kept (`views`): they also say whether any node reports a duplicate identity.

Views come from the network: they are validated on receipt (malformed ones never get here,
they are counted against their sender) and accepted only from the node they name.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection

import anyio

from discovery.health import HEALTH_TOPIC, ClusterViews, HealthView
from discovery.peers import ExchangeBook
from router import Router

__all__ = ["StageExchange", "exchanged_addrs"]


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
        self._skip = skip
        self._heard = heard
        self._due = anyio.Event()
        # Each address is handed to the dialer once, at most 16 per view (a view is the word of
        # one node), and the dialer forgets it after one failure (discovery.peers).
        self._book = ExchangeBook()

    def follow(self) -> None:
        """Start following the views (once; later calls do nothing)."""
        self._due.set()

    async def run(self) -> None:
        """Wait for `follow`, then subscribe to the views and act on them until cancelled."""
        await self._due.wait()
        await self.router.register_topic(HEALTH_TOPIC)
        async for view in self.router.receiver(HEALTH_TOPIC):
            self.views.add(view)
            if view.role == "stage" and view.node_id != self.router.node_id:
                skip = set(self.router.connected) | set(self._skip())
                for addr in self._book.fresh(exchanged_addrs(view, skip)):
                    self.router.add_peer_addr(addr, "exchange")
            self._heard(view)


def exchanged_addrs(view: HealthView, skip: set[str]) -> list[str]:
    """Where a stage node's view says stage nodes listen: its own addresses and its peers'
    (not observers', not those in `skip`). The view was validated on receipt (typed, bounded
    in length and number: discovery.health)."""
    out: list[str] = []
    if view.node_id not in skip:
        out += view.addrs
    for row in view.peers:
        if not row.observer and row.peer not in skip:
            out += row.listen_addrs
    return out
