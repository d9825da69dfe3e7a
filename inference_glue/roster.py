"""Which peers may serve a client's pipeline, and when its plan should change.

A client meets peers through its router (bootstrap addresses, the stage nodes' health views,
nodes that dial it). `Roster` sorts them, so that the client asks each peer what it serves
once and re-plans only when the set of nodes it could use differs from the plan's:

- a *stage node* answered an `InfoQuery` with this client's model: usable while connected;
- *strangers* (other clients, nodes of another model) are left alone until they disconnect:
  a peer that comes back may be something else by then; a peer that did not answer in time
  is *silent*, asked again when a health view says it is a stage node (a loaded node may
  answer late);
- *lost* nodes are those this client gave up on while their connection stayed open (no answer
  to its probe): they are usable again once they answer, or once their connection cycles. A
  node lost because its connection closed needs no entry: it is not connected, so not usable,
  and a new connection (a resumed process, a healed link) is its return;
- *quarantined* nodes (corrupt hidden states, `CorruptionTracker`) and nodes that *refused* a
  plan are never used again by this client: that exclusion is deliberate.

Nodes are ranked by when they first took part in a plan, and plans list them in that order,
so that a node that returns gets its old place (and its old layers, when the set is the same
as before).

Sans-IO: the client feeds it what it hears and asks it what to do.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

__all__ = ["Roster"]


class Roster:
    """The client's knowledge of the peers that could serve its pipeline."""

    def __init__(self, own_id: str) -> None:
        self.own_id = own_id
        self.budgets: dict[str, int] = {}  # stage nodes of this model -> bytes they may hold
        self.strangers: set[str] = set()
        self.silent: set[str] = set()
        self.lost: set[str] = set()
        self.refused: set[str] = set()
        self.quarantined: set[str] = set()
        self._ranks: dict[str, int] = {}

    @property
    def excluded(self) -> set[str]:
        """Peers that must not be planned now."""
        return self.lost | self.refused | self.quarantined

    # -- what the client hears -------------------------------------------------------------

    def served(self, peer: str, budget: int) -> None:
        """`peer` answered as a stage node of this model, able to hold `budget` bytes."""
        self.budgets[peer] = budget
        for group in (self.strangers, self.silent, self.lost):
            group.discard(peer)

    def stranger(self, peer: str) -> None:
        """`peer` answered as something else (another model, another BLAS set-up)."""
        self.budgets.pop(peer, None)
        self.silent.discard(peer)
        self.strangers.add(peer)

    def no_answer(self, peer: str) -> None:
        """`peer`, never heard as a stage node, did not answer in time."""
        if peer not in self.budgets:
            self.silent.add(peer)

    def claims_stage(self, peer: str) -> bool:
        """A health view says `peer` is a stage node: True if it should be asked again."""
        if peer in self.silent:
            self.silent.discard(peer)
            return True
        return False

    def disconnected(self, peer: str) -> None:
        """The last connection to `peer` closed: whatever comes back is judged afresh."""
        for group in (self.strangers, self.silent, self.lost):
            group.discard(peer)

    def lose(self, peer: str, connected: bool) -> None:
        """The client gave up on `peer` (`connected`: its connection is still open)."""
        if connected:
            self.lost.add(peer)

    def rank(self, nodes: Iterable[str]) -> None:
        """`nodes` (in pipeline order) form a plan: give new ones the places after the rest."""
        for node in nodes:
            self._ranks.setdefault(node, len(self._ranks))

    # -- what the client should do ---------------------------------------------------------

    def to_ask(self, connected: Collection[str]) -> list[str]:
        """Connected peers to ask what they serve: never asked (or back since), or lost."""
        return sorted(
            p
            for p in connected
            if p != self.own_id
            and p not in self.refused | self.quarantined | self.strangers | self.silent
            and (p not in self.budgets or p in self.lost)
        )

    def usable(self, connected: Collection[str]) -> list[str]:
        """Connected stage nodes that may be planned, in rank order."""
        nodes = [p for p in self.budgets if p in connected and p not in self.excluded]
        return self.ordered(nodes)

    def ordered(self, nodes: Iterable[str]) -> list[str]:
        """`nodes` by rank (nodes never planned last, by id)."""
        return sorted(nodes, key=lambda p: (self._ranks.get(p, math.inf), p))
