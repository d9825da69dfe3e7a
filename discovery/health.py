"""Sharing health: every node publishes its view of its peers on one topic, so any node (or
`p2pr health`, which joins as an observer) sees the whole cluster.

A view also says which run of the node sent it (`instance`, random per start): two live
instances under one node id mean one identity on two machines (a cloned disk), and every
node that notices says so in its own view.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from router.topics import PublishPolicy, TypedTopic

# How long a view counts as current, and how long two instances of one id must both be
# heard from within to count as a duplicate (a restart replaces an instance at once).
VIEW_TTL = 5.0
DUPLICATE_WINDOW = 3.0


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
        self._instances: dict[str, dict[str, float]] = {}

    def add(self, view: HealthView, now: float | None = None) -> None:
        """Record a received view."""
        now = time.time() if now is None else now
        self.views[view.node_id] = view
        seen = self._instances.setdefault(view.node_id, {})
        seen[view.instance] = now
        for instance in [i for i, t in seen.items() if now - t > DUPLICATE_WINDOW]:
            del seen[instance]

    def duplicates(self, now: float | None = None) -> list[str]:
        """Node ids under which two live instances were heard recently (or claim to be us)."""
        now = time.time() if now is None else now
        out = set()
        for node_id, seen in self._instances.items():
            live = [i for i, t in seen.items() if now - t <= DUPLICATE_WINDOW]
            if len(live) > 1 or (node_id == self.own_id and live != [self.own_instance]):
                out.add(node_id)
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
