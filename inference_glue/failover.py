"""Failover: the client's rules for surviving a dead or corrupting stage node.

The client drives recovery because it holds everything a resumed request needs: the prompt,
the tokens delivered so far (the token stream is checksummed and in order), and the nodes.
When a stage is lost (its connection closes: a killed process; or its health turns "dead":
phi accrual on a hung one) or keeps sending corrupt hidden states, the client

A closed connection marks a stage lost at once; phi accrual only makes it a suspect, which a
probe (a reliable `InfoQuery` it fails to answer) must confirm, since heartbeats also go
missing on a lossy but working link.

1. releases the request on the nodes left and marks the lost node excluded,
2. asks every reachable node what it can hold (`InfoReply.memory_budget`) and re-plans the
   layers over them with `plan_stages` (an error at once when nothing fits: `ModelDoesNotFitError`),
3. sends each a `Reconfigure` under a new plan epoch and waits for them to load their layers,
4. resubmits the request under a new id (`<id>~<attempt>`) with `RequestMeta.resume` = the
   tokens already delivered; the stages replay them step by step, which rebuilds the KV
   caches bit for bit (deterministic sampling is keyed by position), so the stream continues
   at the next seq with exactly the text a run without failure gives. When one stage was
   lost, the plan first hands its layers to a neighbour (`handoff_plan`): then the stages
   take over the previous attempt's KV caches and only the neighbour rebuilds the layers it
   gained, locally (`kv_handoff`), so recovery does not grow with the replayed answer.

This module holds the pure parts: the policy, the planning, the per-peer corruption count
that leads to quarantine, and the records of what happened (`PeerEvent`, `Recovery`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import attrs

from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint

__all__ = [
    "CorruptionTracker",
    "FailoverPolicy",
    "ModelDoesNotFitError",
    "NodeOffer",
    "PeerEvent",
    "Recovery",
    "attempt_id",
    "plan_stages",
]

log = logging.getLogger("p2pr.inference.failover")


@attrs.frozen
class FailoverPolicy:
    """How a client reacts to failures.

    Args:
        enabled: resume on the nodes left when a stage is lost (False: raise at once).
        max_corrupt: N consecutive corrupt hidden states from one peer get it quarantined
            (below N the request is retried on the same nodes).
        max_attempts: failovers of one request before it fails.
        reconfigure_timeout: seconds the nodes get to load their new layers.
        query_timeout: seconds a node gets to say what it can hold.
        health_interval: how often the stages' health (phi accrual) is read while streaming.
        hang_after: seconds without a token before a stage that phi accrual calls dead is
            probed (while tokens flow, the pipeline is evidently alive).
        probe_timeout: seconds a probed stage gets to answer before it counts as hung.
    """

    enabled: bool = True
    max_corrupt: int = 3
    max_attempts: int = 8
    reconfigure_timeout: float = 60.0
    query_timeout: float = 3.0
    health_interval: float = 0.5
    hang_after: float = 1.0
    probe_timeout: float = 3.0

    def __attrs_post_init__(self) -> None:
        if self.max_corrupt < 1 or self.max_attempts < 0:
            raise ValueError("max_corrupt must be >= 1 and max_attempts >= 0")


@attrs.frozen
class NodeOffer:
    """A node that can take part in a plan: its id and the bytes of weights it may hold."""

    node_id: str
    memory_budget: int


def plan_stages(footprint: ModelFootprint, offers: Sequence[NodeOffer]) -> list[tuple[str, range]]:
    """(node id, layers) per stage, in pipeline order, over `offers` (in the order given);
    nodes that get no layers are left out. Raises `ModelDoesNotFitError` at once when no
    contiguous split fits the nodes' budgets (one node left: the whole model on it)."""
    ranges = footprint.place([o.memory_budget for o in offers])
    return [(o.node_id, r) for o, r in zip(offers, ranges) if r]


def attempt_id(request_id: str, attempt: int) -> str:
    """The wire id of a request's `attempt`-th try: chunks and messages of an earlier try
    never mix with a later one's."""
    return request_id if attempt == 0 else f"{request_id}~{attempt}"


@attrs.frozen
class PeerEvent:
    """Something the client noticed about a node, for the log and the operator."""

    at: float  # time.time()
    peer: str
    stage: int | None
    kind: str  # lost, corrupt, quarantined, reconfigured, replanned, refused, stranger
    detail: str

    def line(self) -> str:
        """'quarantine peer=…  stage=1  kind=corrupt: …' for logs."""
        stage = "-" if self.stage is None else str(self.stage)
        return f"{self.kind}: peer={self.peer} stage={stage} {self.detail}"


class CorruptionTracker:
    """Counts consecutive corrupt hidden states per peer; at `limit` the peer is quarantined
    (for good: it is never planned again by this client)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.quarantined: set[str] = set()

    def corrupt(self, peer: str) -> bool:
        """Count one; True when this makes `peer` quarantined."""
        self.counts[peer] = self.counts.get(peer, 0) + 1
        if self.counts[peer] >= self.limit and peer not in self.quarantined:
            self.quarantined.add(peer)
            return True
        return False

    def progress(self, peers: Iterable[str]) -> None:
        """Good data came through `peers`: their runs of failures end."""
        for peer in peers:
            self.counts.pop(peer, None)


@attrs.define
class Recovery:
    """One failover of one request, with its timings (time.perf_counter())."""

    request_id: str
    attempt: int
    reason: str
    lost: tuple[str, ...]
    detected_at: float
    resumed_from: int = 0  # tokens delivered before, replayed by the new attempt
    route: tuple[str, ...] = ()
    layers: tuple[tuple[int, int], ...] = ()
    replanned_at: float | None = None
    first_token_at: float | None = None
    # The stages took over the request's KV caches (`kv_handoff`) instead of replaying it.
    handoff: bool = False

    @property
    def replan_seconds(self) -> float | None:
        """From detection to the nodes holding their new layers."""
        return None if self.replanned_at is None else self.replanned_at - self.detected_at

    @property
    def recover_seconds(self) -> float | None:
        """From detection to the first new token reaching the client."""
        return None if self.first_token_at is None else self.first_token_at - self.detected_at

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "request_id": self.request_id,
            "attempt": self.attempt,
            "reason": self.reason,
            "lost": list(self.lost),
            "resumed_from": self.resumed_from,
            "route": list(self.route),
            "layers": [list(r) for r in self.layers],
            "handoff": self.handoff,
            "replan_s": _round(self.replan_seconds),
            "recover_s": _round(self.recover_seconds),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def now() -> float:
    """The clock of `Recovery` timings."""
    return time.perf_counter()
