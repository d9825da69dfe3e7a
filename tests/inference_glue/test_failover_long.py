"""Failover late in a long answer, across real stage node processes: SIGKILL of the middle or
the first stage after token 200 of 256. The answer continues identical to mlx-lm's own
single-process answer, and the delivered tokens were replayed in a few batches of decode
steps (`inference_glue.replay`), not one message per token through the pipeline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.replay import REPLAY_BATCH
from inference_glue.tokens import TokenChunk
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster

pytestmark = pytest.mark.multinode

TOKENS = 256
KILL_AFTER = 200


@pytest.fixture(scope="module")
def case(tiny_8_layers: Path) -> dict[str, Any]:
    prompt = prompt_token_ids(load_tokenizer(tiny_8_layers), "Once upon a time, far away")
    return {"prompt_ids": prompt, "max_tokens": TOKENS, "temp": 0.8, "seed": 11}


@pytest.fixture(scope="module")
def expected(tiny_8_layers: Path, case: dict[str, Any]) -> dict[str, Any]:
    answer = run_reference(tiny_8_layers, [case])[0]
    assert len(answer["token_ids"]) == TOKENS, "the seed must give an answer without EOS"
    return answer


async def stream_kill_and_count(
    cluster: StageCluster, case: dict[str, Any], victim: int
) -> tuple[list[TokenChunk], PipelineClient, dict[str, Any]]:
    chunks: list[TokenChunk] = []
    async with PipelineClient.connect(cluster.addrs, cluster.model_dir) as client:
        stream = client.stream(case["prompt_ids"], TOKENS, temp=case["temp"], seed=case["seed"])
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.seq == KILL_AFTER - 1:
                cluster.kill(victim)
        stats = await client.stats()
    return chunks, client, stats


@pytest.mark.parametrize("victim", [1, 0], ids=["middle", "first"])
def test_a_late_sigkill_replays_the_answer_in_a_few_batches(
    tiny_8_layers: Path, case: dict[str, Any], expected: dict[str, Any], victim: int
) -> None:
    with StageCluster(tiny_8_layers, 3) as cluster:
        lost = cluster.nodes[victim].node_id
        chunks, client, stats = anyio.run(stream_kill_and_count, cluster, case, victim)
    assert [c.seq for c in chunks] == list(range(TOKENS)), "a gap or a duplicate"
    assert [c.token_id for c in chunks] == expected["token_ids"]
    assert "".join(c.text for c in chunks) == expected["text"]
    [recovery] = client.recoveries
    assert recovery.lost == (lost,) and len(recovery.route) == 2
    replayed = recovery.resumed_from
    assert replayed >= KILL_AFTER
    survivors = [n["work"] for n in stats["nodes"] if n["name"] != "client"]
    assert len(survivors) == 2
    # The new first stage ran every delivered token again, one decode step each ...
    assert sorted(w["replayed_tokens"] for w in survivors) == [0, replayed]
    # ... but each stage got them in batches: a handful of messages, not one per token.
    for work in survivors:
        assert 1 <= work["replay_batches"] <= math.ceil(replayed / REPLAY_BATCH)
