"""A pipeline's counters as its client reports them (`PipelineClient.stats()`): every node's,
the client's own, and one row per link node -> peer.

A link row's counters are what `node` recorded about `peer`: `checksum_failures` are frames
from the peer that failed their checksum there, `retransmits` are messages the node sent the
peer again, `nacks_sent` holes it asked the peer to fill, `shim_corrupted` frames from the
peer that the node's own fault shim damaged (tests and chaos runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from discovery.health import ClusterViews
from inference_glue.messages import StatsReply
from inference_glue.plan import StageInfo

__all__ = ["LINK_COUNTERS", "cluster_stats", "stage_records"]

# Per-peer health counters shown for each link (node -> peer).
LINK_COUNTERS = (
    "checksum_failures",
    "decode_errors",
    "retransmits",
    "nacks_sent",
    "nacks_received",
    "losses",
    "unrecoverable",
    "shim_corrupted",
)


def cluster_stats(
    replies: Sequence[StatsReply], own: dict[str, Any], own_id: str, names: dict[str, str]
) -> dict[str, Any]:
    """`{"nodes": [...], "links": [...]}` from the stage nodes' `StatsReply`s and the
    client's own counters (`Router.counters()` plus its `work`); `names`: peer id ->
    'stage i' / 'client'."""
    nodes: list[dict[str, Any]] = [
        {
            "name": names[r.node_id],
            "node_id": r.node_id,
            "protocol": r.protocol,
            "shim": r.shim,
            "peers": r.peers,
            "work": r.work,
        }
        for r in replies
    ]
    nodes.append(
        {
            "name": "client",
            "node_id": own_id,
            "protocol": own["protocol"],
            "shim": own["shim"],
            "peers": own["peers"],
            "work": own["work"],
        }
    )
    links = []
    for node in nodes:
        for peer, health in node["peers"].items():
            if peer not in names:
                continue
            row: dict[str, Any] = {
                "node": node["name"],
                "peer": names[peer],
                "node_id": node["node_id"],
                "peer_id": peer,
            }
            row.update({name: health.get(name, 0) for name in LINK_COUNTERS})
            p50 = health.get("rtt_p50")
            row["rtt_p50_ms"] = None if p50 is None else round(p50 * 1000, 3)
            links.append(row)
    return {"nodes": nodes, "links": links}


def stage_records(
    stages: Sequence[StageInfo], views: ClusterViews, join_addrs: Sequence[str]
) -> list[dict[str, Any]]:
    """The stages as a kept pipeline's record lists them (`p2pr.kept.record_plan`): node id,
    pid, layers, and where the node listens (its health view says; else the address the
    client joined it at)."""
    records = []
    for s in stages:
        view = views.views.get(s.node_id)
        addrs = list(view.addrs) if view is not None else []
        addrs += [a for a in join_addrs if a.endswith(f"/p2p/{s.node_id}")]
        layers = [s.layers.start, s.layers.stop]
        records.append({"node_id": s.node_id, "pid": s.pid, "layers": layers, "addrs": addrs})
    return records
