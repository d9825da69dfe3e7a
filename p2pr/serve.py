"""The `p2pr serve` process: one node per machine, whose layers come from the cluster's plan.

    node = ServeNode(ServeSettings(model_dir, node_settings, memory_budget=…), identity)
    anyio.run(node.run)           # until cancelled (SIGINT/SIGTERM in `p2pr serve`)

A serve node is a cluster node (`discovery.node.ClusterNode`: its router, discovery by
bootstrap address, peers file or mDNS, the cluster secret, health sharing) that also runs a
pipeline stage node (`inference_glue.node.StageNode`). It starts with no layers: it holds
the model's structure with no weight read (`load_unplanned`), and advertises in its health
view the model it serves, "name@fingerprint" (`model_fingerprint`: config, tokenizer and
weight files, the digest the planner compares before it uses a node: a revision with the
same tensor shapes differs too), its memory budget and its addresses. The client that plans the pipeline (the node with an API,
`p2pr.serve_api`) places the layers over the serve nodes it sees, in proportion to their
memory budgets, and sends each its layers (`Reconfigure`); nodes that join or leave are
re-planned between requests, and a node lost during a request is failed over.

A serve node of another model is no part of the pipeline: the planner never plans it in
(its files' fingerprint differs), and both it and the nodes of the cluster say so, once per
such peer, as a `refused` event line and on standard error.

Event lines (`p2pr.launch`): `ready` once the node listens and holds its (unplanned) stage,
`refused` per node of another model, and those of the API (`p2pr.serve_api`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import attrs

from discovery.health import HealthView
from discovery.identity import NodeIdentity
from discovery.node import ClusterNode, NodeSettings
from inference_glue.footprint import format_bytes, model_fingerprint
from inference_glue.node import StageNode
from inference_glue.stage import PipelineStage, load_unplanned
from inference_glue.worker import MlxWorker

from .api import ApiSettings
from .launch import print_event

__all__ = ["ServeNode", "ServeSettings", "advertised_model", "fingerprint_of"]

log = logging.getLogger("p2pr.serve")


@attrs.frozen
class ServeSettings:
    """What a serve node is told.

    Attributes:
        model_dir: the node's copy of the model (every node of a cluster has the same).
        node: the cluster node's settings (listen address, discovery, cluster secret).
        memory_budget: bytes of weights this node may hold (the plan respects it).
        model_name: the model's name for clients and the API (default: the folder's name).
        compute: where the MLX work runs (`MlxWorker`: "inline" or "thread").
        api: the API's settings (None: no API, and this node plans nothing).
        api_port: the API's port (0: any free one).
    """

    model_dir: Path
    node: NodeSettings
    memory_budget: int
    model_name: str = ""
    compute: str = "thread"
    api: ApiSettings | None = None
    api_port: int = 0

    @property
    def name(self) -> str:
        """The model's name."""
        return self.model_name or self.model_dir.resolve().name


def advertised_model(name: str, fingerprint: str) -> str:
    """What a node's health view says it serves: 'name@fingerprint' (at most 160
    characters)."""
    return f"{name[:120]}@{fingerprint}"


def fingerprint_of(advertised: str) -> str:
    """The fingerprint in an advertised model (nodes may name one model differently)."""
    return advertised.rpartition("@")[2]


class ServeNode:
    """A serve node (see the module docstring), run by `run` until cancelled."""

    def __init__(self, settings: ServeSettings, identity: NodeIdentity) -> None:
        self.settings = settings
        self.node_identity = identity
        self.fingerprint = ""
        self.model = ""
        self.cluster: ClusterNode | None = None  # made by `run`, once the fingerprint is known
        self.stage_node: StageNode | None = None
        self.refused: dict[str, str] = {}  # peer -> the model it serves, another one
        self._views_changed = anyio.Event()

    @property
    def node_id(self) -> str:
        """This node's peer id."""
        return self.node_identity.node_id

    @property
    def listen_addrs(self) -> list[str]:
        """Where other nodes reach this one (every interface's address for 0.0.0.0)."""
        return self.cluster.router.listen_addrs if self.cluster is not None else []

    def same_model_nodes(self) -> dict[str, tuple[list[str], int]]:
        """Serve nodes with this node's model whose views are current, this node included:
        peer id -> (addresses, memory budget)."""
        nodes = {self.node_id: (self.listen_addrs, self.settings.memory_budget)}
        views = self.cluster.views.current() if self.cluster is not None else []
        for view in views:
            same = view.model and fingerprint_of(view.model) == self.fingerprint
            if same and view.node_id != self.node_id:
                nodes[view.node_id] = (list(view.addrs), view.memory_budget)
        return nodes

    async def views_changed(self) -> None:
        """Wait until the next health view arrives."""
        await self._views_changed.wait()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, load the model's structure, serve; `task_status.started()` once ready."""
        settings = self.settings
        self.fingerprint = await anyio.to_thread.run_sync(model_fingerprint, settings.model_dir)
        self.model = advertised_model(settings.name, self.fingerprint)
        node_settings = attrs.evolve(
            settings.node,
            role="stage",
            label="serve",
            silent_peers_observe=True,  # clients (the API's planner) come and go
            model=self.model,
            memory_budget=settings.memory_budget,
        )
        self.cluster = ClusterNode(node_settings, self.node_identity, on_view=self._heard)
        worker = MlxWorker(settings.compute)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.cluster.run)
                self.stage_node = await self._stage_node(worker)
                tg.start_soon(self.stage_node.serve)
                print_event(
                    "ready",
                    node_id=self.node_id,
                    addrs=self.listen_addrs,
                    pid=os.getpid(),
                    model=self.model,
                    memory_budget=settings.memory_budget,
                )
                if settings.api is not None:
                    from .serve_api import run_api

                    tg.start_soon(run_api, self)
                task_status.started()
        finally:
            worker.close()

    async def _stage_node(self, worker: MlxWorker) -> StageNode:
        """The stage node, unplanned: the model's structure, no weight read."""
        model_dir = self.settings.model_dir
        loaded: tuple[PipelineStage, Any] = await worker.run(load_unplanned, model_dir)
        stage, tokenizer = loaded
        config = json.loads((model_dir / "config.json").read_text())
        assert self.cluster is not None
        return StageNode(
            self.cluster.router,
            stage,
            tokenizer,
            stage_index=0,
            num_stages=1,
            model=self.settings.name,
            fingerprint=self.fingerprint,
            worker=worker,
            vocab_size=int(config["vocab_size"]),
            model_dir=model_dir,
            memory_budget=self.settings.memory_budget,
            planned=False,
        )

    def _heard(self, view: HealthView) -> None:
        """A health view arrived: wake the waiters; a node of another model is refused."""
        self._views_changed.set()
        self._views_changed = anyio.Event()
        if (
            view.role != "stage"
            or not view.model
            or fingerprint_of(view.model) == self.fingerprint
            or self.refused.get(view.node_id) == view.model
        ):
            return
        self.refused[view.node_id] = view.model
        where = view.addrs[0].split("/p2p/")[0] if view.addrs else "an unknown address"
        message = (
            f"node {view.node_id} at {where} serves model {view.model}, this node "
            f"{self.model} ({format_bytes(self.settings.memory_budget)} budget): a cluster "
            "serves one model, so the two are not mixed; start every node with the same "
            "model files (or give the other node another cluster secret)"
        )
        log.error("refused: %s", message)
        print_event("refused", peer=view.node_id, model=view.model, message=message)
