"""The API of a serve node (`p2pr serve --api-port`), and the client that plans the cluster's
pipeline behind it.

The node with the API runs, in its own process, a `PipelineClient` on a router of its own
(a new identity; the node's listen host and cluster secret). Once the serve nodes of its
model that it sees can hold the model between them (their advertised memory budgets), the
client joins them all, this process's own stage node included, and places the layers over
them (`Planner.adopt`: nodes with no layers yet get a plan). From then on it follows the
nodes' health views, so nodes that join later are dialled, asked what they serve and
planned in between requests; a node that leaves is planned out; one lost during a request
is failed over. The OpenAI-compatible API (`p2pr.api`) serves over that client.

Event lines: `waiting` (the nodes seen cannot hold the model yet, or the pipeline could not
be formed: tried again as views arrive), `api` once the API listens, `plan` whenever the
pipeline's plan changes (its epoch and each stage's node and layers), `failover` before it
for each request resumed on other nodes since (`Recovery.to_dict`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from inference_glue.client import PipelineClient, PipelineError
from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint
from router import EngineConfig, Router, RouterConfig

from .api import PipelineBackend, serve_api
from .launch import print_event
from .render import console

if TYPE_CHECKING:
    from .serve import ServeNode

__all__ = ["run_api"]

_console = console(stderr=True)


async def run_api(node: ServeNode) -> None:
    """Join the serve nodes, then serve the API over them until cancelled (see the module
    docstring). The pipeline is formed again, as views arrive, until it can be."""
    settings = node.settings
    assert settings.api is not None
    footprint = await anyio.to_thread.run_sync(ModelFootprint.from_dir, settings.model_dir)
    while True:
        nodes = await _enough_nodes(node, footprint)
        router = _client_router(node, [a for addrs, _ in nodes.values() for a in addrs])
        joined = False
        try:
            async with PipelineClient.over(router, list(nodes), settings.model_dir) as client:
                joined = True
                client.exchange.follow()  # nodes that join later are found in the views
                backend = PipelineBackend.for_model(client, settings.model_dir, settings.name)
                async with anyio.create_task_group() as tg:
                    port = await tg.start(serve_api, backend, settings.api, settings.api_port)
                    url = f"http://{settings.api.host}:{port}/v1"
                    print_event("api", url=url, port=port, model=backend.model_id)
                    _console.print(f"OpenAI-compatible API at {url} (model {backend.model_id!r})")
                    await _report_plans(client)
        except (PipelineError, ModelDoesNotFitError) as exc:
            if joined:
                raise
            print_event("waiting", message=f"the pipeline could not be formed yet: {exc}")
            await node.views_changed()


async def _enough_nodes(
    node: ServeNode, footprint: ModelFootprint
) -> dict[str, tuple[list[str], int]]:
    """The serve nodes of this model seen now, once their memory budgets can hold it:
    peer id -> (addresses, budget)."""
    told = False
    while True:
        nodes = node.same_model_nodes()
        try:
            footprint.place([budget for _, budget in nodes.values()])
            return nodes
        except ModelDoesNotFitError as exc:
            if not told:
                message = f"waiting for more nodes of this model: {exc}"
                print_event("waiting", message=message)
                _console.print(message)
                told = True
        await node.views_changed()


def _client_router(node: ServeNode, addrs: Sequence[str]) -> Router:
    """The planning client's router: reachable where the node is, with its secret."""
    own = node.settings.node
    engine = EngineConfig(
        listen_host=own.listen_host,
        bootstrap=tuple(dict.fromkeys(addrs)),
        cluster_secret=own.cluster_secret,
        faults=own.faults,
    )
    return Router.create(config=RouterConfig(engine=engine))


def _plan_of(client: PipelineClient) -> tuple[Any, ...]:
    return (client.epoch, *((s.node_id, s.layers.start, s.layers.stop) for s in client.stages))


def _changed(client: PipelineClient, plan: tuple[Any, ...]) -> bool:
    return _plan_of(client) != plan


async def _report_plans(client: PipelineClient) -> None:
    """A `plan` event line (and a line on standard error) whenever the plan changes, after a
    `failover` line for each request failed over since the last one."""
    reported = 0
    while True:
        plan = _plan_of(client)
        for recovery in client.recoveries[reported:]:
            print_event("failover", **recovery.to_dict())
        reported = len(client.recoveries)
        if all(s.layers for s in client.stages):  # not the placeholder of unplanned nodes
            stages = [
                {"stage": s.index, "node_id": s.node_id, "layers": [s.layers.start, s.layers.stop]}
                for s in client.stages
            ]
            print_event("plan", epoch=client.epoch, stages=stages)
            layout = ", ".join(
                f"…{s.node_id[-6:]} layers {s.layers.start}-{s.layers.stop - 1}"
                for s in client.stages
            )
            _console.print(f"plan {client.epoch}: {layout}")
        await client.wait_until(functools.partial(_changed, client, plan), math.inf)
