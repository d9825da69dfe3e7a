"""Sharing health: every node publishes its view of its peers on one topic, so any node (or
`p2pr health`, which joins as an observer) sees the whole cluster.

A view also says which run of the node sent it (`instance`, random per start): two live
instances under one node id, heard interleaved, mean one identity on two machines (a cloned
disk). A restart (one instance after the other) and a pause (one instance, silent for a
while) are not. Each node reports only what it heard itself, and the report expires; `p2pr
health` shows the union of the reports, but no node repeats another's (reports that echo
each other would never clear).
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from p2p_reliable.twins import TwinDetector
from router.topics import PublishPolicy, TypedTopic

# How long a view counts as current. Two instances of one id count as a duplicate while both
# were heard within DUPLICATE_WINDOW; views of an instance that stopped may still arrive for
# up to DUPLICATE_SLACK after its successor's first (gossip delays under load).
VIEW_TTL = 5.0
DUPLICATE_WINDOW = 10.0
DUPLICATE_SLACK = 1.5


@attrs.frozen
class HealthView:
    """One node's view of the cluster, as published."""

    node_id: str
    instance: str
    role: str  # "node", "observer" (`p2pr health`), "stage" (a pipeline stage) or "exo"
    addrs: list[str]
    sent_at: float  # wall clock, seconds
    peers: list[dict[str, Any]]
    duplicates: list[str] = attrs.Factory(list)
    label: str = ""  # what the node is, for people: "stage 1" ("" for a plain node)


HEALTH_TOPIC = TypedTopic("p2pr/health", PublishPolicy.Always, HealthView)


class ClusterViews:
    """The latest view from every node, and the duplicate identities they reveal."""

    def __init__(self, own_id: str, own_instance: str) -> None:
        self.own_id = own_id
        self.own_instance = own_instance
        self.views: dict[str, HealthView] = {}
        self._twins = TwinDetector(window=DUPLICATE_WINDOW, slack=DUPLICATE_SLACK)

    def add(self, view: HealthView, now: float | None = None) -> None:
        """Record a received view (our own, looped back, included)."""
        now = time.time() if now is None else now
        self.views[view.node_id] = view
        self._twins.heard(view.node_id, view.instance, now)
        if view.node_id == self.own_id:
            # We are alive whether or not our own view came back: a view of another
            # instance of our id interleaves with us, not with a gap in our echoes.
            self._twins.heard(self.own_id, self.own_instance, now)

    def first_hand(self, now: float | None = None) -> list[str]:
        """Node ids this node itself heard from two interleaved instances, recently: what
        it reports in its own view."""
        return self._twins.twins(time.time() if now is None else now)

    def duplicates(self, now: float | None = None) -> list[str]:
        """Every duplicate identity known here: our own evidence and what the current views
        report (their own evidence, and the peers their routers saw under two epochs)."""
        now = time.time() if now is None else now
        out = set(self.first_hand(now))
        for view in self.current(now):
            out.update(view.duplicates)
            out.update(p["peer"] for p in view.peers if p.get("duplicate"))
        return sorted(out)

    def current(self, now: float | None = None) -> list[HealthView]:
        """Views young enough to trust, sorted by node id."""
        now = time.time() if now is None else now
        fresh = [v for v in self.views.values() if now - v.sent_at <= VIEW_TTL]
        return sorted(fresh, key=lambda v: v.node_id)

    def observers(self) -> set[str]:
        """Ids that announced themselves as observers (CLI sessions), not cluster members."""
        return {v.node_id for v in self.views.values() if v.role == "observer"}

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The cluster as `p2pr health --json` prints it."""
        now = time.time() if now is None else now
        observers = self.observers()
        nodes = {}
        for view in self.current(now):
            if view.role == "observer":
                continue
            nodes[view.node_id] = {
                "role": view.role,
                "label": view.label,
                "instance": view.instance,
                "addrs": view.addrs,
                "age_s": round(now - view.sent_at, 3),
                "peers": [p for p in view.peers if p["peer"] not in observers],
            }
        return {"time": now, "nodes": nodes, "duplicates": self.duplicates(now)}
