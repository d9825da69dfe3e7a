"""Failover across real stage node processes: SIGKILL mid-generation, fallback to one node,
quarantine after repeated corruption, and an immediate error when nothing can hold the model.

Every generation is compared with mlx-lm's own single-process generation (`run_reference`, in
a process with the nodes' BLAS set-up), token for token and text for text.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import anyio
import pytest

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.failover import FailoverPolicy
from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.tiny_model import build_tiny_model
from inference_glue.tokens import TokenChunk
from p2pr.reference import run_reference
from p2pr.stage_cluster import ClusterStartError, StageCluster
from p2pr.stage_node import HEAD_SPLIT_ENV

pytestmark = pytest.mark.multinode

TOKENS = 64
# Where the SIGKILL falls is drawn from this seed (printed with the kill point): a failing
# run is replayed with the same P2PR_KILL_SEED.
KILL_SEED = int(os.environ.get("P2PR_KILL_SEED", "14"))


def kill_point(test: str) -> int:
    """The token after which `test` kills its node: drawn from KILL_SEED, printed."""
    at = random.Random(f"{KILL_SEED}/{test}").randrange(1, TOKENS - 8)
    print(f"{test}: SIGKILL after token {at} (P2PR_KILL_SEED={KILL_SEED})")
    return at


@pytest.fixture(scope="module")
def tiny_dir(tiny_8_layers: Path) -> Path:
    return tiny_8_layers


@pytest.fixture(scope="module")
def case(tiny_dir: Path) -> dict[str, Any]:
    prompt = prompt_token_ids(load_tokenizer(tiny_dir), "Once upon a time, far away")
    # Seeded sampling: a random tiny model would soon repeat one token under greedy decoding.
    return {"prompt_ids": prompt, "max_tokens": TOKENS, "temp": 0.8, "seed": 11}


@pytest.fixture(scope="module")
def expected(tiny_dir: Path, case: dict[str, Any]) -> dict[str, Any]:
    return run_reference(tiny_dir, [case])[0]


async def stream_with_kill(
    cluster: StageCluster,
    model_dir: Path,
    case: dict[str, Any],
    kill: dict[int, int],
    policy: FailoverPolicy | None = None,
) -> tuple[list[TokenChunk], PipelineClient, dict[int, float]]:
    """Stream `case`; when chunk seq k arrives, SIGKILL node `kill[k]`. Returns the chunks,
    the client (for its records) and the kill times."""
    chunks: list[TokenChunk] = []
    killed: dict[int, float] = {}
    async with PipelineClient.connect(cluster.addrs, model_dir, policy=policy) as client:
        options = {k: case[k] for k in ("temp", "seed") if k in case}
        async for chunk in client.stream(case["prompt_ids"], case["max_tokens"], **options):
            chunks.append(chunk)
            if chunk.seq in kill:
                killed[chunk.seq] = cluster.kill(kill[chunk.seq])
    return chunks, client, killed


def assert_same_as_reference(chunks: list[TokenChunk], expected: dict[str, Any]) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks))), "a gap or a duplicate"
    assert [c.token_id for c in chunks] == expected["token_ids"]
    assert "".join(c.text for c in chunks) == expected["text"]


def test_sigkill_of_a_middle_stage_mid_generation_changes_nothing(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    at = kill_point("middle stage")
    with StageCluster(tiny_dir, 3) as cluster:
        middle = cluster.nodes[1].node_id
        chunks, client, killed = anyio.run(stream_with_kill, cluster, tiny_dir, case, {at: 1})
    assert_same_as_reference(chunks, expected)
    assert len(chunks) == TOKENS
    [recovery] = client.recoveries
    assert recovery.lost == (middle,)
    assert recovery.resumed_from >= at + 1
    assert middle not in recovery.route and len(recovery.route) == 2
    assert recovery.first_token_at is not None
    print(
        f"recovered {recovery.first_token_at - killed[at]:.3f} s after the SIGKILL "
        f"(detected after {recovery.detected_at - killed[at]:.3f} s, re-planned in "
        f"{recovery.replan_seconds:.3f} s); new layers {recovery.layers}"
    )
    kinds = [(e.peer, e.kind) for e in client.events]
    assert (middle, "lost") in kinds


@pytest.mark.parametrize("victim", [0, 2])
def test_a_split_head_survives_the_loss_of_either_end(
    tmp_path_factory: pytest.TempPathFactory, victim: int
) -> None:
    """Tied embeddings, every token's LM head split between the first and the last stage (a
    fixed cut): SIGKILL of either end mid-generation. The request resumes on the two nodes
    left, its head split between their ends, and the output is identical."""
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("tied") / "model", seed=3, num_layers=8, tie_word_embeddings=True
    )
    prompt = prompt_token_ids(load_tokenizer(model_dir), "Once upon a time, far away")
    case = {"prompt_ids": prompt, "max_tokens": TOKENS, "temp": 0.8, "seed": 11}
    expected = run_reference(model_dir, [case])[0]
    at = kill_point(f"split head, stage {victim}")
    with StageCluster(model_dir, 3, extra_env={HEAD_SPLIT_ENV: "fixed"}) as cluster:
        lost = cluster.nodes[victim].node_id
        chunks, client, _ = anyio.run(stream_with_kill, cluster, model_dir, case, {at: victim})
    assert_same_as_reference(chunks, expected)
    assert len(chunks) == TOKENS
    [recovery] = client.recoveries
    assert recovery.lost == (lost,) and len(recovery.route) == 2


def test_fallback_to_one_node_when_the_other_dies(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    with StageCluster(tiny_dir, 2) as cluster:
        first = cluster.nodes[0].node_id
        chunks, client, _ = anyio.run(stream_with_kill, cluster, tiny_dir, case, {10: 1})
    assert_same_as_reference(chunks, expected)
    [recovery] = client.recoveries
    assert recovery.route == (first,)
    assert recovery.layers == ((0, 8),)  # the whole model on the one node left


def test_repeated_corruption_quarantines_the_peer(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    policy = FailoverPolicy(max_corrupt=3)
    # Node 1 damages every hidden state it sends, after the checksum: only the next stage's
    # end-to-end check can catch it.
    with StageCluster(tiny_dir, 3, node_args={1: ["--corrupt-activations=1"]}) as cluster:
        bad = cluster.nodes[1].node_id
        chunks, client, _ = anyio.run(stream_with_kill, cluster, tiny_dir, case, {}, policy)
    assert_same_as_reference(chunks, expected)
    corrupt = [e for e in client.events if e.kind == "corrupt"]
    quarantined = [e for e in client.events if e.kind == "quarantined"]
    assert [e.peer for e in corrupt] == [bad] * 3
    assert [(e.peer, e.stage) for e in quarantined] == [(bad, 1)]
    assert bad in client.corruption.quarantined
    assert all(bad not in r.route for r in client.recoveries[-1:])
    # Two retries on the same nodes, then the move.
    assert len(client.recoveries) == 3


def test_no_node_can_hold_the_model_fails_at_once(tiny_dir: Path, case: dict[str, Any]) -> None:
    footprint = ModelFootprint.from_dir(tiny_dir)
    # Each node holds its half, neither holds the whole model.
    budget = str(int(footprint.total * 0.7))
    with StageCluster(tiny_dir, 2, memory_budget=budget) as cluster:
        survivor = cluster.nodes[0].node_id

        async def main() -> tuple[PipelineClient, str]:
            async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:
                with pytest.raises(ModelDoesNotFitError) as caught:
                    async for chunk in client.stream(case["prompt_ids"], 64, temp=0.8, seed=1):
                        if chunk.seq == 5:
                            cluster.kill(1)
                return client, str(caught.value)

        client, message = anyio.run(main)
    assert "no node can hold the model" in message
    # At once: the plan failed before any node was asked to reconfigure or waited for (not
    # a timeout: the nodes get 60 s to reconfigure, streams 120 s without a token).
    [recovery] = client.recoveries
    assert recovery.replanned_at is None
    assert [(e.kind, e.peer) for e in client.events] == [("lost", cluster.nodes[1].node_id)]
    assert survivor in client.budgets


def test_requests_in_flight_together_fail_over_together(tiny_dir: Path) -> None:
    prompts = ["Once upon a time", "The capital of France is", "In a hole in the ground"]
    tokenizer = load_tokenizer(tiny_dir)
    cases = [
        {"prompt_ids": prompt_token_ids(tokenizer, p), "max_tokens": 40, "temp": 0.7, "seed": i}
        for i, p in enumerate(prompts)
    ]
    expected = run_reference(tiny_dir, cases)
    got: dict[int, list[TokenChunk]] = {i: [] for i in range(len(cases))}

    async def main(cluster: StageCluster) -> PipelineClient:
        async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:

            async def one(i: int) -> None:
                case = cases[i]
                async for chunk in client.stream(
                    case["prompt_ids"], 40, temp=case["temp"], seed=case["seed"]
                ):
                    got[i].append(chunk)
                    # The last stage dies while all three requests are in flight.
                    if i == 0 and chunk.seq == 15:
                        cluster.kill(2)

            async with anyio.create_task_group() as tg:
                for i in range(len(cases)):
                    tg.start_soon(one, i)
            return client

    with StageCluster(tiny_dir, 3) as cluster:
        last = cluster.nodes[2].node_id
        client = anyio.run(main, cluster)
    for i, want in enumerate(expected):
        assert_same_as_reference(got[i], want)
    # One re-plan served every request that was in flight.
    assert [e.kind for e in client.events].count("lost") == 1
    assert len({r.layers for r in client.recoveries}) == 1
    assert all(last not in r.route for r in client.recoveries)


def test_a_node_whose_layers_exceed_its_budget_refuses_to_start(tiny_dir: Path) -> None:
    cluster = StageCluster(tiny_dir, 2, memory_budget="64K")
    with pytest.raises(ClusterStartError, match=r"node 0 .*memory budget of 64\.0 KiB"):
        cluster.start(timeout=120)
