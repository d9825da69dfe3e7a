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

from p2p_reliable import schema
from p2p_reliable.schema import bounded_str, bounded_tuple
from p2p_reliable.twins import TwinDetector
from router.topics import PublishPolicy, TypedTopic

# How long a view counts as current. Two instances of one id count as a duplicate while both
# were heard within DUPLICATE_WINDOW; views of an instance that stopped may still arrive for
# up to DUPLICATE_SLACK after its successor's first (gossip delays under load).
VIEW_TTL = 5.0
DUPLICATE_WINDOW = 10.0
DUPLICATE_SLACK = 1.5


MAX_VIEW_PEERS = 256
MAX_VIEWS = 1024
MAX_ADDRS = 16
_ID = bounded_str(128)
_ADDR = bounded_str(256)
_COUNT = attrs.validators.ge(0)
STATES = ("ALIVE", "SUSPECT", "DEAD", "UNKNOWN")


@attrs.frozen
class PeerRow:
    """How one node sees one peer (a row of `p2pr health`), as it travels in a view."""

    peer: str = attrs.field(validator=_ID)
    state: str = attrs.field(validator=attrs.validators.in_(STATES))
    phi: float
    rtt_ewma: float | None
    rtt_p50: float | None
    rtt_p99: float | None
    loss_ratio: float
    retransmit_ratio: float
    sent: int = attrs.field(validator=_COUNT)
    retransmits: int = attrs.field(validator=_COUNT)
    received: int = attrs.field(validator=_COUNT)
    nacks_sent: int = attrs.field(validator=_COUNT)
    nacks_received: int = attrs.field(validator=_COUNT)
    losses: int = attrs.field(validator=_COUNT)
    checksum_failures: int = attrs.field(validator=_COUNT)
    decode_errors: int = attrs.field(validator=_COUNT)
    unrecoverable: int = attrs.field(validator=_COUNT)
    rejections: dict[str, int] = attrs.field(validator=attrs.validators.max_len(64))
    last_seen: float | None
    score: float
    last_seen_s_ago: float | None = None
    address: str | None = attrs.field(default=None, validator=attrs.validators.optional(_ADDR))
    connected: bool = False
    listen_addrs: tuple[str, ...] = attrs.field(
        default=(), validator=bounded_tuple(MAX_ADDRS, _ADDR)
    )
    duplicate: bool = False
    observer: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The row as `p2pr health --json` prints it."""
        row: dict[str, Any] = schema.unstructure(self)
        return row


@attrs.frozen
class HealthView:
    """One node's view of the cluster, as published (validated field by field on receipt;
    accepted only from the node it names: see HEALTH_TOPIC)."""

    node_id: str = attrs.field(validator=_ID)
    instance: str = attrs.field(validator=bounded_str(64))
    role: str = attrs.field(validator=bounded_str(32))  # "node", "observer", "stage", "exo"
    addrs: tuple[str, ...] = attrs.field(validator=bounded_tuple(MAX_ADDRS, _ADDR))
    sent_at: float  # wall clock, seconds
    peers: tuple[PeerRow, ...] = attrs.field(validator=bounded_tuple(MAX_VIEW_PEERS))
    duplicates: tuple[str, ...] = attrs.field(
        default=(), validator=bounded_tuple(MAX_VIEW_PEERS, _ID)
    )
    label: str = attrs.field(default="", validator=bounded_str(64))  # "stage 1", "" for a node
    # A stage node (`p2pr serve`) advertises the model it serves, "name@identity"
    # (`inference_glue.footprint.model_identity`), and the bytes of weights it may hold.
    model: str = attrs.field(default="", validator=bounded_str(160))
    memory_budget: int = attrs.field(default=0, validator=_COUNT)


HEALTH_TOPIC = TypedTopic("p2pr/health", PublishPolicy.Always, HealthView, origin_field="node_id")


class ClusterViews:
    """The latest view from every node, and the duplicate identities they reveal."""

    def __init__(self, own_id: str, own_instance: str) -> None:
        self.own_id = own_id
        self.own_instance = own_instance
        self.views: dict[str, HealthView] = {}
        self._twins = TwinDetector(window=DUPLICATE_WINDOW, slack=DUPLICATE_SLACK)

    def add(self, view: HealthView, now: float | None = None) -> None:
        """Record a received view (our own, looped back, included). At most MAX_VIEWS are
        kept: the oldest (by arrival) goes first, as a node that stopped publishing does."""
        now = time.time() if now is None else now
        self.views.pop(view.node_id, None)
        self.views[view.node_id] = view
        while len(self.views) > MAX_VIEWS:
            del self.views[next(iter(self.views))]
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
            out.update(p.peer for p in view.peers if p.duplicate)
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
                "model": view.model,
                "memory_budget": view.memory_budget,
                "instance": view.instance,
                "addrs": view.addrs,
                "age_s": round(now - view.sent_at, 3),
                "peers": [p.to_dict() for p in view.peers if p.peer not in observers],
            }
        return {"time": now, "nodes": nodes, "duplicates": self.duplicates(now)}
