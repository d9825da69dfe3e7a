"""An optional Prometheus endpoint (`p2pr node --metrics-port`): GET /metrics and GET /health.

Served by hypercorn (an ASGI server that runs under trio and asyncio alike) with a Starlette
app, and rendered by prometheus_client: no hand-written HTTP, so a client that connects and
says nothing, or sends garbage, costs a closed connection, never the node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .http import bind_tcp, serve_asgi

if TYPE_CHECKING:
    from .node import ClusterNode

# (metric, field of a peer's health row, gauge or counter, help)
_PEER_METRICS = [
    ("p2pr_peer_up", "connected", "gauge", "1 while a connection to the peer is open"),
    ("p2pr_peer_phi", "phi", "gauge", "phi-accrual suspicion level"),
    ("p2pr_peer_score", "score", "gauge", "health score, 0 (dead) to 1"),
    ("p2pr_peer_rtt_p50_seconds", "rtt_p50", "gauge", "median round-trip time"),
    ("p2pr_peer_rtt_p99_seconds", "rtt_p99", "gauge", "99th percentile round-trip time"),
    ("p2pr_peer_loss_ratio", "loss_ratio", "gauge", "share of sequence numbers lost"),
    ("p2pr_peer_retransmits", "retransmits", "counter", "retransmitted sequence numbers"),
    ("p2pr_peer_nacks_sent", "nacks_sent", "counter", "NACKed sequence numbers"),
    ("p2pr_peer_checksum_failures", "checksum_failures", "counter", "damaged envelopes"),
    ("p2pr_peer_decode_errors", "decode_errors", "counter", "malformed envelopes"),
    ("p2pr_peer_unrecoverable", "unrecoverable", "counter", "messages given up"),
]
_STATES = ("alive", "suspect", "dead", "unknown")


class _HealthCollector(Collector):
    """One scrape's worth of a node's health rows and rejection counts, as metrics."""

    def __init__(
        self, node_id: str, peers: list[dict[str, Any]], rejections: dict[tuple[str, str], int]
    ) -> None:
        self.node_id, self.peers, self.rejections = node_id, peers, rejections

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "peer"]
        for name, field, kind, text in _PEER_METRICS:
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "gauge":
                family = GaugeMetricFamily(name, text, labels=labels)
            else:
                family = CounterMetricFamily(name, text, labels=labels)
            for row in self.peers:
                value = row.get(field)
                if value is not None:
                    family.add_metric([self.node_id, row["peer"]], float(value))
            yield family
        state = GaugeMetricFamily(
            "p2pr_peer_state", "1 for the peer's current state", labels=[*labels, "state"]
        )
        for row in self.peers:
            for name in _STATES:
                hit = 1.0 if str(row.get("state", "")).lower() == name else 0.0
                state.add_metric([self.node_id, row["peer"], name], hit)
        yield state
        rejected = CounterMetricFamily(
            "p2pr_rejected",
            "input from a peer refused, by kind (bad envelope, wrong secret, bad payload, ...)",
            labels=[*labels, "kind"],
        )
        for (peer, kind), count in sorted(self.rejections.items()):
            rejected.add_metric([self.node_id, peer, kind], float(count))
        yield rejected


def render_metrics(
    node_id: str,
    peers: list[dict[str, Any]],
    rejections: dict[tuple[str, str], int] | None = None,
) -> str:
    """Prometheus text exposition of one node's peer health and rejections."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_HealthCollector(node_id, peers, rejections or {}))
    return generate_latest(registry).decode()


def rejection_counts(
    peers: list[dict[str, Any]], extra: dict[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    """Every rejection kind per peer: the protocol's (health rows) and the layers' above."""
    out: dict[tuple[str, str], int] = dict(extra)
    for row in peers:
        kinds = {**row.get("rejections", {})}
        kinds["malformed envelope"] = row.get("decode_errors", 0)
        kinds["checksum"] = row.get("checksum_failures", 0)
        for kind, count in kinds.items():
            if count:
                key = (row["peer"], kind)
                out[key] = out.get(key, 0) + int(count)
    return out


class MetricsServer:
    """GET /metrics (Prometheus text) and GET /health (JSON) on 127.0.0.1."""

    def __init__(self, node: ClusterNode, port: int, host: str = "127.0.0.1") -> None:
        self.node, self.port, self.host = node, port, host
        self.app = Starlette(
            routes=[Route("/metrics", self._metrics), Route("/health", self._health)]
        )

    async def _metrics(self, request: Request) -> Response:
        peers = await self.node.router.health()
        counts = rejection_counts(peers, await self.node.router.rejections())
        body = render_metrics(self.node.node_id, peers, counts)
        return Response(body, media_type="text/plain; version=0.0.4")

    async def _health(self, request: Request) -> Response:
        peers = await self.node.router.health()
        return JSONResponse({"node": self.node.node_id, "peers": peers})

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled (started once it listens)."""
        sock = bind_tcp(self.host, self.port)
        self.port = sock.getsockname()[1]
        await serve_asgi(self.app, sock, task_status=task_status)
