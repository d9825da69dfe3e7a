"""Stage nodes, the client and its failover driver in one process, over `MemoryRouter`s.

The same `StageNode` and `PipelineClient` as across processes, with real mlx-lm layers of the
tiny model; the network is the in-memory double (`router.memory`), so a whole pipeline, a
failover and a re-plan take a second or two. Every generation is compared with mlx-lm's own
single-process generation, in this process (same BLAS: bit for bit).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from inference_glue.client import PipelineClient
from inference_glue.failover import FailoverPolicy
from inference_glue.footprint import model_fingerprint
from inference_glue.local_pipeline import generate_single
from inference_glue.messages import (
    CLIENT_STREAM,
    REQUEST_STREAM,
    Failure,
    GenerateRequest,
    RequestMeta,
    decode_message,
    encode_message,
)
from inference_glue.node import StageNode
from inference_glue.stage import load_stage, load_unplanned
from inference_glue.worker import MlxWorker
from router.memory import MemoryNetwork, MemoryRouter

PROMPT = [1, 17, 42, 7, 99, 3]
CASE: dict[str, Any] = {"temp": 0.8, "seed": 11}
TOKENS = 24


class Pipeline:
    """Stage nodes on a memory network, each run in a cancel scope of its own (a kill)."""

    def __init__(self, network: MemoryNetwork, model_dir: Path, tg: anyio.abc.TaskGroup) -> None:
        self.network = network
        self.model_dir = model_dir
        self.tg = tg
        self.fingerprint = model_fingerprint(model_dir)
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.nodes: dict[str, StageNode] = {}

    def add(self, node_id: str, layers: range, index: int, stages: int, **options: Any) -> str:
        """A stage node serving `layers` (`range(0)`: an unplanned node, no weight read)."""
        router = self.network.router(node_id)
        if layers:
            stage, tokenizer = load_stage(self.model_dir, layers)
        else:
            stage, tokenizer = load_unplanned(self.model_dir)
            index, stages, options["planned"] = 0, 1, False
        node = StageNode(
            router,
            stage,
            tokenizer,
            stage_index=index,
            num_stages=stages,
            model="tiny",
            fingerprint=self.fingerprint,
            worker=MlxWorker("inline"),
            vocab_size=stage.vocab_size,
            model_dir=self.model_dir,
            **options,
        )
        self.nodes[node_id] = node
        scope = self.scopes[node_id] = anyio.CancelScope()

        async def run() -> None:
            with scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(router.run)
                    tg.start_soon(node.serve)

        self.tg.start_soon(run)
        return node_id

    def kill(self, node_id: str) -> None:
        """As a SIGKILL: its connections close at once, and it stops."""
        self.network.kill(node_id)
        self.scopes[node_id].cancel()


@asynccontextmanager
async def pipeline(
    model_dir: Path, splits: Sequence[range], options: dict[int, dict[str, Any]] | None = None
) -> AsyncIterator[tuple[Pipeline, list[str]]]:
    """Stage nodes serving `splits` (`options`: more StageNode arguments, by index); their
    ids."""
    network = MemoryNetwork()
    options = options or {}
    async with anyio.create_task_group() as tg:
        nodes = Pipeline(network, model_dir, tg)
        ids = [
            nodes.add(f"stage-{i}", r, i, len(splits), **options.get(i, {}))
            for i, r in enumerate(splits)
        ]
        yield nodes, ids
        tg.cancel_scope.cancel()


def client_over(nodes: Pipeline, ids: list[str], **options: Any) -> Any:
    router: MemoryRouter = nodes.network.router("client")
    return PipelineClient.over(router, ids, nodes.model_dir, timeout=30, **options)


def reference(model_dir: Path, max_tokens: int = TOKENS) -> list[int]:
    return list(generate_single(model_dir, PROMPT, max_tokens, **CASE).token_ids)


async def collect(client: PipelineClient, on_seq: Callable[[int], None] | None = None) -> list[int]:
    tokens = []
    async for chunk in client.stream(PROMPT, TOKENS, **CASE):
        tokens.append(chunk.token_id)
        if on_seq is not None:
            on_seq(chunk.seq)
    return tokens


@pytest.fixture(scope="module")
def model_dir(tiny_8_layers: Path) -> Path:
    return tiny_8_layers


async def test_three_stages_in_one_process_equal_single_process_mlx_lm(model_dir: Path) -> None:
    expected = reference(model_dir)
    async with pipeline(model_dir, [range(0, 3), range(3, 6), range(6, 8)]) as (nodes, ids):
        async with client_over(nodes, ids) as client:
            assert [s.node_id for s in client.stages] == ids
            assert await collect(client) == expected
            # A second request on the same nodes (their caches released after the first).
            assert await collect(client) == expected
            stats = await client.stats()
    work = {node["name"]: node["work"] for node in stats["nodes"]}
    assert work["stage 2"]["tokens_sampled"] == 2 * TOKENS
    assert all(work[f"stage {i}"]["in_flight"] == 0 for i in range(3))


async def test_nodes_with_no_layers_yet_are_given_a_memory_weighted_plan(model_dir: Path) -> None:
    expected = reference(model_dir)
    budgets = {0: 1 << 30, 1: 1 << 29, 2: 1 << 29}
    options = {i: {"memory_budget": b} for i, b in budgets.items()}
    async with pipeline(model_dir, [range(0)] * 3, options) as (nodes, ids):
        infos = [nodes.nodes[i].control.info() for i in ids]
        assert {(i.num_stages, i.layer_start, i.layer_stop, i.num_layers) for i in infos} == {
            (0, 0, 0, 8)
        }
        async with client_over(nodes, ids) as client:
            assert [(s.node_id, s.layers) for s in client.stages] == [
                (ids[0], range(0, 4)),
                (ids[1], range(4, 6)),
                (ids[2], range(6, 8)),
            ]
            assert await collect(client) == expected


async def test_an_unplanned_node_refuses_requests(model_dir: Path) -> None:
    async with pipeline(model_dir, [range(0)]) as (nodes, ids):
        requester = nodes.network.router("requester")
        replies = requester.direct_receiver(CLIENT_STREAM)
        async with anyio.create_task_group() as tg:
            tg.start_soon(requester.run)
            await requester.wait_ready()
            meta = RequestMeta("r1", 4, 0.0, 1.0, None, 512, (ids[0],), "requester")
            request = GenerateRequest(meta, tuple(PROMPT))
            await requester.send_to(ids[0], REQUEST_STREAM, encode_message(request))
            with anyio.fail_after(30):
                reply = decode_message((await anext(aiter(replies))).payload)
            tg.cancel_scope.cancel()
    assert isinstance(reply, Failure) and "holds no layers yet" in reply.message
    assert nodes.nodes[ids[0]].counters.requests == 0


async def test_the_failover_driver_resumes_after_a_lost_stage(model_dir: Path) -> None:
    expected = reference(model_dir)
    async with pipeline(model_dir, [range(0, 3), range(3, 6), range(6, 8)]) as (nodes, ids):
        async with client_over(nodes, ids) as client:

            def kill_middle(seq: int) -> None:
                if seq == 8:
                    nodes.kill(ids[1])

            assert await collect(client, kill_middle) == expected
            [recovery] = client.recoveries
            assert recovery.lost == (ids[1],) and "connection closed" in recovery.reason
            assert recovery.resumed_from >= 9
            assert [s.node_id for s in client.stages] == [ids[0], ids[2]]
            assert client.stages[0].layers.start == 0 and client.stages[-1].layers.stop == 8
            assert (ids[1], "lost") in [(e.peer, e.kind) for e in client.events]


async def test_a_message_lost_between_two_live_stages_resumes_the_request(
    model_dir: Path,
) -> None:
    """Stage 0 gives up a hidden state to stage 1 (partitioned from it; the client reaches
    both): it fails the request with kind "lost" at once, the client finds stage 1 answering
    and resumes on the same plan. Without the report the client would wait for a token
    while every stage looks alive."""
    expected = reference(model_dir)
    async with pipeline(model_dir, [range(0, 3), range(3, 6), range(6, 8)]) as (nodes, ids):
        first = nodes.network.routers[ids[0]]
        async with client_over(nodes, ids) as client, anyio.create_task_group() as tg:

            async def heal_at_the_verdict() -> None:
                await first.wait_protocol_event()
                first.set_faults(None, [])

            def cut(seq: int) -> None:
                if seq == 8:
                    first.set_faults(None, [ids[1]])
                    tg.start_soon(heal_at_the_verdict)

            with anyio.fail_after(60):
                assert await collect(client, cut) == expected
            [recovery] = client.recoveries
            assert recovery.lost == () and recovery.route == tuple(ids)
            assert "given up" in recovery.reason and "resuming on the same plan" in recovery.reason
            assert [s.node_id for s in client.stages] == ids
        assert nodes.nodes[ids[0]].counters.failed == 1


async def test_a_stage_that_keeps_corrupting_is_quarantined(model_dir: Path) -> None:
    expected = reference(model_dir)
    splits = [range(0, 3), range(3, 6), range(6, 8)]
    bad = {1: {"corrupt_activations": 1.0}}  # every hidden state it sends is damaged
    async with pipeline(model_dir, splits, bad) as (nodes, ids):
        async with client_over(nodes, ids) as client:
            assert await collect(client) == expected
            assert client.corruption.quarantined == {ids[1]}
            kinds = [e.kind for e in client.events if e.peer == ids[1]]
            assert kinds.count("corrupt") == 3 and "quarantined" in kinds
            assert ids[1] not in [s.node_id for s in client.stages]


async def test_a_hung_stage_is_found_by_its_health_and_a_probe(model_dir: Path) -> None:
    expected = reference(model_dir)
    policy = FailoverPolicy(health_interval=0.1, hang_after=0.2, probe_timeout=0.5)
    async with pipeline(model_dir, [range(0, 4), range(4, 8)]) as (nodes, ids):
        async with client_over(nodes, ids, policy=policy) as client:

            def hang_last(seq: int) -> None:
                if seq == 5:
                    nodes.network.hang(ids[1])

            assert await collect(client, hang_last) == expected
            [recovery] = client.recoveries
            assert recovery.lost == (ids[1],) and "no answer to a probe" in recovery.reason
            assert [s.node_id for s in client.stages] == [ids[0]]  # one node holds it all


async def test_rebalance_brings_a_joined_node_into_the_plan(model_dir: Path) -> None:
    expected = reference(model_dir)
    async with pipeline(model_dir, [range(0, 4), range(4, 8)]) as (nodes, ids):
        # Without the client's own upkeep, only rebalance() (or the next request) changes
        # the plan.
        async with client_over(nodes, ids, keep_plan=False) as client:
            assert await collect(client) == expected
            epoch = client.epoch
            nodes.add("spare", range(0, 4), 0, 2)  # a node that joins between requests
            assert await client.wait_until(lambda: "spare" in client.router.connected, 10)
            assert [s.node_id for s in client.stages] == ids  # not planned by itself
            assert await client.rebalance() is True
            assert [s.node_id for s in client.stages] == [*ids, "spare"]
            assert client.epoch > epoch
            layers = [s.layers for s in client.stages]
            assert layers[0].start == 0 and layers[-1].stop == 8
            assert all(a.stop == b.start for a, b in itertools.pairwise(layers))
            assert await client.rebalance() is False  # nothing changed since
            assert await collect(client) == expected  # and the new plan serves the same text
