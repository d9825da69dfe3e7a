"""A cluster node: the reliable router, discovery, identity and shared health, together.

`p2pr node` runs one; `p2pr health` runs one as an observer. Everything else (exo, the
inference stages) can hold one too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import attrs

from p2p_reliable import schema
from router import Router, RouterConfig
from router.config import EngineConfig
from router.faults import FAULTS_ENV, FaultConfig
from router.membership import Role
from router.ratelog import RateLimitedLog

from .health import HEALTH_TOPIC, MAX_ADDRS, MAX_VIEW_PEERS, ClusterViews, HealthView, PeerRow
from .identity import NodeIdentity, ephemeral_identity
from .metrics import MetricsServer
from .peers import ExchangeBook

log = logging.getLogger("p2pr.node")


@attrs.frozen
class NodeSettings:
    """What `p2pr node` is told on its command line."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    bootstrap: tuple[str, ...] = ()
    static_peers: tuple[str, ...] = ()
    mdns: bool = False
    cluster_secret: bytes | None = None
    role: str = "node"
    label: str = ""  # shown by `p2pr health` next to the node id
    model: str = ""  # the model a stage node serves, "name@identity" (HealthView.model)
    memory_budget: int = 0  # the bytes of weights a stage node may hold
    # Flag peers that never published a view of their own as observers, as `p2pr health`
    # sessions are: a pipeline stage's other peers are its clients, which come and go (one
    # that left is no dead node).
    silent_peers_observe: bool = False
    health_interval: float = 1.0
    metrics_port: int | None = None
    faults: FaultConfig | None = None  # injected between protocol and libp2p (chaos tests)


class ClusterNode:
    """Router + discovery + health sharing, run by `run()` until cancelled."""

    def __init__(
        self,
        settings: NodeSettings,
        identity: NodeIdentity | None = None,
        router: Router | None = None,
        on_view: Callable[[HealthView], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_view = on_view  # called with every view received (after it is recorded)
        self.identity = identity or ephemeral_identity()
        engine = EngineConfig(
            role=Role.OBSERVER if settings.role == "observer" else Role.MEMBER,
            listen_host=settings.listen_host,
            listen_port=settings.listen_port,
            bootstrap=tuple(settings.bootstrap),
            static_peers=tuple(settings.static_peers),
            enable_mdns=settings.mdns,
            cluster_secret=settings.cluster_secret,
            faults=settings.faults,
        )
        # An application that already runs a Router (exo's adapter) shares health through it.
        self.router = router or Router(self.identity.key_pair, RouterConfig(engine=engine))
        self.views = ClusterViews(self.identity.node_id, self.identity.instance)
        self.peers: list[dict[str, Any]] = []
        self.ready = False
        self._log = RateLimitedLog(log, interval=60.0)
        self._exchange = ExchangeBook()
        self.metrics: MetricsServer | None = None

    @property
    def node_id(self) -> str:
        """This node's peer id."""
        return self.identity.node_id

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run router and health sharing until cancelled; `task_status.started()` once the
        node listens."""
        await self.router.register_topic(HEALTH_TOPIC)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.router.run)
            await tg.start(self.share_health)
            task_status.started()

    async def share_health(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish this node's health view and collect the others' on a router that runs
        (its HEALTH_TOPIC registered), until cancelled."""
        views = self.router.receiver(HEALTH_TOPIC)
        await self.router.wait_ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._receive_views, views)
            tg.start_soon(self._publish_views)
            if self.settings.metrics_port is not None:
                self.metrics = MetricsServer(self, self.settings.metrics_port)
                await tg.start(self.metrics.serve)
            self.ready = True
            task_status.started()

    async def _receive_views(self, views: Any) -> None:
        async for view in views:
            self.views.add(view)
            if self.on_view is not None:
                self.on_view(view)
            if view.role == "observer" or view.node_id == self.node_id:
                continue
            # Peer exchange: nodes that only know a bootstrap node still end up in a full
            # mesh, which point-to-point acks and repairs need. Each address is handed to
            # the dialer once, at most MAX_EXCHANGE_PER_VIEW per view (a view is the word
            # of one node, which may lie), and the dialer forgets it after one failure.
            known = [*view.addrs]
            for peer in view.peers:
                if not peer.observer and peer.peer != self.node_id and peer.connected:
                    known += peer.listen_addrs
            for addr in self._exchange.fresh(known):
                self.router.add_peer_addr(addr, "exchange")
            if self.node_id in view.duplicates:
                self._log.log(
                    logging.ERROR,
                    view.node_id,
                    "my identity",
                    "node %s hears another live node using MY identity %s: "
                    "two machines share one identity file (a cloned disk?)",
                    view.node_id,
                    self.node_id,
                )

    async def _publish_views(self) -> None:
        sender = self.router.sender(HEALTH_TOPIC)
        states: dict[str, str] = {}
        last = -math.inf
        while True:
            # Publish at once on any state change (a death must travel fast), else every
            # health_interval. States are polled cheaply; the full view (addresses,
            # counters) only when it is published: an idle node stays nearly idle. A poll,
            # since a state is a function of time (phi accrual crosses its thresholds as
            # heartbeats fail to come): no event marks the moment it changes.
            now_states = await self.router.health_states()
            if now_states != states or time.monotonic() - last >= self.settings.health_interval:
                self.peers = await self.router.health()
                states = {p["peer"]: p["state"] for p in self.peers}
                last = time.monotonic()
                await sender.send(self._view())
            await anyio.sleep(0.05)

    def _view(self) -> HealthView:
        observers = self.views.observers()
        if self.settings.silent_peers_observe:
            spoke = set(self.views.views)
            observers |= {p["peer"] for p in self.peers if p["peer"] not in spoke}
        rows = [
            {**p, "observer": p["peer"] in observers or p["observer"]}
            for p in self.peers[:MAX_VIEW_PEERS]
        ]
        return HealthView(
            node_id=self.node_id,
            instance=self.identity.instance,
            role=self.settings.role,
            addrs=tuple(self.router.listen_addrs[:MAX_ADDRS]),
            sent_at=time.time(),
            peers=tuple(schema.structure(row, PeerRow) for row in rows),
            duplicates=tuple(self.views.first_hand()[:MAX_VIEW_PEERS]),
            label=self.settings.label,
            model=self.settings.model,
            memory_budget=self.settings.memory_budget,
        )


def settings_from(
    *,
    listen: str | None,
    bootstrap: Sequence[str],
    static_peers: Sequence[str],
    mdns: bool,
    cluster_secret: str | None,
    role: str = "node",
    metrics_port: int | None = None,
) -> NodeSettings:
    """NodeSettings from command-line style values (`--listen /ip4/H/tcp/P`)."""
    host, port = "127.0.0.1", 0
    if listen:
        parts = listen.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "ip4" or parts[2] != "tcp":
            raise ValueError(f"--listen wants /ip4/<address>/tcp/<port>, not {listen!r}")
        host, port = parts[1], int(parts[3])
    faults = os.environ.get(FAULTS_ENV)
    return NodeSettings(
        faults=FaultConfig.parse(faults) if faults else None,
        listen_host=host,
        listen_port=port,
        bootstrap=tuple(bootstrap),
        static_peers=tuple(static_peers),
        mdns=mdns,
        cluster_secret=cluster_secret.encode() if cluster_secret else None,
        role=role,
        metrics_port=metrics_port,
    )
