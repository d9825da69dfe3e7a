"""An optional Prometheus endpoint (`p2pr node --metrics-port`) with the health counters."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketStream

if TYPE_CHECKING:
    from .node import ClusterNode

# (metric, field of a peer's health row, type, help)
_PEER_METRICS = [
    ("p2pr_peer_up", "connected", "gauge", "1 while a connection to the peer is open"),
    ("p2pr_peer_phi", "phi", "gauge", "phi-accrual suspicion level"),
    ("p2pr_peer_score", "score", "gauge", "health score, 0 (dead) to 1"),
    ("p2pr_peer_rtt_p50_seconds", "rtt_p50", "gauge", "median round-trip time"),
    ("p2pr_peer_rtt_p99_seconds", "rtt_p99", "gauge", "99th percentile round-trip time"),
    ("p2pr_peer_loss_ratio", "loss_ratio", "gauge", "share of sequence numbers lost"),
    ("p2pr_peer_retransmits_total", "retransmits", "counter", "retransmitted sequence numbers"),
    ("p2pr_peer_nacks_sent_total", "nacks_sent", "counter", "NACKed sequence numbers"),
    ("p2pr_peer_checksum_failures_total", "checksum_failures", "counter", "damaged envelopes"),
    ("p2pr_peer_decode_errors_total", "decode_errors", "counter", "malformed envelopes"),
    ("p2pr_peer_unrecoverable_total", "unrecoverable", "counter", "messages given up"),
]
_STATES = ("alive", "suspect", "dead", "unknown")


def render_metrics(node_id: str, peers: list[dict[str, Any]]) -> str:
    """Prometheus text exposition of one node's peer health."""
    lines = []
    for name, field, kind, text in _PEER_METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for row in peers:
            value = row.get(field)
            if value is None:
                continue
            lines.append(f'{name}{{node="{node_id}",peer="{row["peer"]}"}} {float(value)}')
    lines += [
        "# HELP p2pr_peer_state 1 for the peer's current state",
        "# TYPE p2pr_peer_state gauge",
    ]
    for row in peers:
        for state in _STATES:
            hit = 1 if row.get("state") == state else 0
            labels = f'node="{node_id}",peer="{row["peer"]}",state="{state}"'
            lines.append(f"p2pr_peer_state{{{labels}}} {hit}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """GET /metrics (Prometheus text) and GET /health (JSON) on 127.0.0.1."""

    def __init__(self, node: ClusterNode, port: int, host: str = "127.0.0.1") -> None:
        self.node, self.port, self.host = node, port, host

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled."""
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            with anyio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    request += await client.receive(4096)
                path = request.split(b" ", 2)[1].decode(errors="replace") if b" " in request else ""
                peers = await self.node.router.health() if path in ("/metrics", "/health") else []
                if path == "/metrics":
                    body = render_metrics(self.node.node_id, peers).encode()
                    kind = "text/plain; version=0.0.4"
                    status = "200 OK"
                elif path == "/health":
                    body = json.dumps({"node": self.node.node_id, "peers": peers}).encode()
                    kind, status = "application/json", "200 OK"
                else:
                    body, kind, status = b"not found\n", "text/plain", "404 Not Found"
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                await client.send(head.encode() + body)
