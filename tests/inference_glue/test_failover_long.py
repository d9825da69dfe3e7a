"""Failover late in a long answer, across real stage node processes: SIGKILL of the middle or
the first stage after token 200 of 256. The answer continues identical to mlx-lm's own
single-process answer, and the surviving stages took over their KV caches: the neighbour
that gained the lost layers rebuilt only those, locally (`inference_glue.kv_handoff`), and
nothing was replayed through the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.tokens import TokenChunk
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster

pytestmark = pytest.mark.multinode

TOKENS = 256
KILL_AFTER = 200
WORK = ("handoffs", "rebuild_forwards", "replayed_tokens", "replay_batches")


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
def test_a_late_sigkill_rebuilds_only_the_lost_layers(
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
    print(f"after the SIGKILL: {[{k: w[k] for k in WORK} for w in survivors]}")
    # The stages took over their caches: nothing was replayed through the pipeline ...
    assert recovery.handoff
    for work in survivors:
        assert work["handoffs"] == 1
        assert work["replayed_tokens"] == 0 and work["replay_batches"] == 0
    # ... and the neighbour that gained the lost layers rebuilt them locally, one forward
    # per prefill piece and per delivered token but the last; the other stage rebuilt none.
    rebuilt = sorted(w["rebuild_forwards"] for w in survivors)
    assert rebuilt[0] == 0 and replayed - 1 < rebuilt[1] <= replayed - 1 + len(case["prompt_ids"])
