"""Stage nodes that hang and return, or die and restart: the pipeline takes them back.

Real stage node processes (3 stages of a tiny 8-layer model) and a real client. Every
generation is compared with mlx-lm's own single-process generation, token for token. No test
waits on a fixed sleep: the 5 s pause is the fault itself; everything else waits for the
event it needs (the client hears it), with a bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.tokens import TokenChunk
from p2pr.kept import running_cluster
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster

pytestmark = pytest.mark.multinode

P2PR = str(Path(sys.executable).parent / "p2pr")
TOKENS = 48
PAUSE_S = 5.0
# Bounds on events: a loaded 2-core machine may take a while, a broken one never gets there.
BACK_WITHIN_S = 90.0
DUPLICATE_WORDS = ("MY identity", "duplicate")


@pytest.fixture(scope="module")
def tiny_dir(tiny_8_layers: Path) -> Path:
    return tiny_8_layers


@pytest.fixture(scope="module")
def case(tiny_dir: Path) -> dict[str, Any]:
    prompt = prompt_token_ids(load_tokenizer(tiny_dir), "Once upon a time, far away")
    return {"prompt_ids": prompt, "max_tokens": TOKENS, "temp": 0.8, "seed": 11}


@pytest.fixture(scope="module")
def expected(tiny_dir: Path, case: dict[str, Any]) -> dict[str, Any]:
    return run_reference(tiny_dir, [case])[0]


async def generate(
    client: PipelineClient,
    case: dict[str, Any],
    on_chunk: Callable[[TokenChunk], None] = lambda _: None,
) -> list[TokenChunk]:
    chunks = []
    stream = client.stream(
        case["prompt_ids"], case["max_tokens"], temp=case["temp"], seed=case["seed"]
    )
    async for chunk in stream:
        chunks.append(chunk)
        on_chunk(chunk)
    return chunks


def assert_same_as_reference(chunks: list[TokenChunk], expected: dict[str, Any]) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks))), "a gap or a duplicate"
    assert [c.token_id for c in chunks] == expected["token_ids"]
    assert "".join(c.text for c in chunks) == expected["text"]


def route(client: PipelineClient) -> list[str]:
    return [s.node_id for s in client.stages]


async def fresh_views(client: PipelineClient, nodes: list[str], since: float) -> None:
    """Wait until every node's health view sent after `since` (wall clock) has come."""

    def fresh() -> bool:
        views = client.views.views
        return all(n in views and views[n].sent_at > since for n in nodes)

    assert await client.wait_until(fresh, BACK_WITHIN_S), "health views stopped coming"


async def assert_no_duplicate_report(client: PipelineClient, cluster: StageCluster) -> None:
    """No node, and not the client's own router, reports a duplicate identity."""
    assert client.views.duplicates() == []
    rows = await client.router.health()
    assert not [r["peer"] for r in rows if r.get("duplicate")]
    for node in cluster.nodes:
        text = node.stderr_text(lines=200)
        assert not [w for w in DUPLICATE_WORDS if w in text], f"{node.label}:\n{text}"


def test_a_paused_stage_is_the_same_node_and_serves_again(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    """SIGSTOP a stage for 5 s, then SIGCONT: first in the middle of a request (the request
    fails over to the two others and completes), then between requests. Each time the next
    request runs on all three stages again, in the same order as before the pause, with
    mlx-lm's output; no node ever reports a duplicate identity."""

    async def main(cluster: StageCluster) -> None:
        ids = [n.node_id for n in cluster.nodes]
        async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:
            assert_same_as_reference(await generate(client, case), expected)
            before = route(client)
            assert sorted(before) == sorted(ids)
            paused: list[float] = []

            def pause_at_token_5(chunk: TokenChunk) -> None:
                if chunk.seq == 5:
                    paused.append(cluster.hang(1))

            # 1. In the middle of a request.
            chunks = await generate(client, case, pause_at_token_5)
            assert_same_as_reference(chunks, expected)
            [recovery] = client.recoveries
            assert recovery.lost == (ids[1],) and ids[1] not in recovery.route
            await anyio.sleep(max(0.0, PAUSE_S - (time.perf_counter() - paused[0])))
            cluster.resume(1)
            resumed = time.time()
            await client.wait_for_stages(3, BACK_WITHIN_S)
            chunks = await generate(client, case)
            assert_same_as_reference(chunks, expected)
            assert route(client) == before
            assert "returned" in [e.kind for e in client.events if e.peer == ids[1]]
            await fresh_views(client, ids, resumed)
            await assert_no_duplicate_report(client, cluster)

            # 2. Between requests: the node is found hung and cut, then comes back.
            stopped = cluster.hang(1)
            assert await client.wait_until(
                lambda: ids[1] not in client.router.connected, BACK_WITHIN_S
            ), "the router never cut the hung node"
            await anyio.sleep(max(0.0, PAUSE_S - (time.perf_counter() - stopped)))
            cluster.resume(1)
            resumed = time.time()
            assert await client.wait_until(
                lambda: ids[1] in client.router.connected, BACK_WITHIN_S
            ), "the resumed node never reconnected"
            chunks = await generate(client, case)
            assert_same_as_reference(chunks, expected)
            assert route(client) == before
            assert len(client.recoveries) == 1  # no failover: the plan was mended first
            await fresh_views(client, ids, resumed)
            await assert_no_duplicate_report(client, cluster)
            print("\n".join(e.line() for e in client.events))

    with StageCluster(tiny_dir, 3) as cluster:
        anyio.run(main, cluster)


def test_a_link_broken_between_two_live_stages_fails_the_request_over_at_once(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Stages 0 and 1 cut from each other mid-request, both still reaching the client: stage
    0 gives its hidden states up (a 3 s retry budget) and fails the request ("lost"), and
    the client, finding stage 1 alive, resumes it on the same three stages; the cut heals
    once it has. The client alone could not tell: it would wait for a token that never
    comes, every stage alive and connected."""
    budget = ["--retry-budget=3"]

    async def main(cluster: StageCluster) -> None:
        ids = [n.node_id for n in cluster.nodes]
        async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:
            async with anyio.create_task_group() as tg:

                async def cut_until_resumed() -> None:
                    await client.set_faults("", {ids[0]: [ids[1]], ids[1]: [ids[0]]})
                    resumed = await client.wait_until(
                        lambda: bool(client.recoveries), BACK_WITHIN_S
                    )
                    await client.set_faults("")
                    assert resumed, "the request never failed over"

                def cut_at_token_5(chunk: TokenChunk) -> None:
                    if chunk.seq == 5:
                        tg.start_soon(cut_until_resumed)

                with anyio.fail_after(BACK_WITHIN_S):
                    chunks = await generate(client, case, cut_at_token_5)
            assert_same_as_reference(chunks, expected)
            first = client.recoveries[0]
            assert first.lost == () and first.route == tuple(ids), first.reason
            assert "resuming on the same plan" in first.reason, first.reason
            assert all(r.lost == () for r in client.recoveries)
            assert route(client) == ids
            print("\n".join(e.line() for e in client.events), first.reason)

    nodes = StageCluster(tiny_dir, 3, fault_control=True, node_args={0: budget, 1: budget})
    with nodes as cluster:
        anyio.run(main, cluster)


def test_a_restarted_stage_found_through_one_survivor_brings_the_pipeline_back(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    """SIGKILL the last stage mid-request (failover to two), restart it bootstrapping from
    the first stage only (not from the client): the client finds it through the stage
    nodes' health views and re-plans over three nodes by itself, between requests."""

    async def main(cluster: StageCluster) -> None:
        async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:

            def kill_at_token_5(chunk: TokenChunk) -> None:
                if chunk.seq == 5:
                    cluster.kill(2)

            assert_same_as_reference(await generate(client, case, kill_at_token_5), expected)
            assert len(client.recoveries) == 1 and len(client.stages) == 2
            node = await anyio.to_thread.run_sync(lambda: cluster.restart(2, bootstrap_from=[0]))
            stages = await client.wait_for_stages(3, BACK_WITHIN_S)
            assert [s.node_id for s in stages][-1] == node.node_id
            chunks = await generate(client, case)
            assert_same_as_reference(chunks, expected)
            assert route(client) == [n.node_id for n in cluster.nodes]
            assert len(client.recoveries) == 1
            print("\n".join(e.line() for e in client.events))

    with StageCluster(tiny_dir, 3) as cluster:
        anyio.run(main, cluster)


def test_a_restarted_stage_is_used_by_the_next_request_without_waiting(
    tiny_dir: Path, case: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Between requests: the middle stage is killed and restarted (bootstrapping from the
    last stage). Once the client is connected to the new node, the very next request re-plans
    first and runs on all three."""

    async def main(cluster: StageCluster) -> None:
        async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:
            assert_same_as_reference(await generate(client, case), expected)
            cluster.kill(1)
            node = await anyio.to_thread.run_sync(lambda: cluster.restart(1, bootstrap_from=[2]))
            assert await client.wait_until(
                lambda: node.node_id in client.router.connected, BACK_WITHIN_S
            ), "the client never met the restarted node"
            chunks = await generate(client, case)
            assert_same_as_reference(chunks, expected)
            assert node.node_id in route(client) and len(client.stages) == 3
            assert client.recoveries == []
            print("\n".join(e.line() for e in client.events))

    with StageCluster(tiny_dir, 3) as cluster:
        anyio.run(main, cluster)


def test_a_kept_pipeline_follows_its_failover(
    tiny_dir: Path, tmp_path: Path, case: dict[str, Any]
) -> None:
    """`p2pr generate` on a kept 3-node pipeline; its middle node is SIGKILLed while the text
    streams. The request fails over to the two others and completes; `p2pr pipeline status`
    says the pipeline runs on those two (not `gone`), and the next `p2pr generate` joins
    them (no node stopped, none started) with mlx-lm's output."""
    env = {**os.environ, "P2PR_CACHE_DIR": str(tmp_path)}
    tokens = 300  # the kill lands while the text streams, long before the end
    [expected] = run_reference(tiny_dir, [{**case, "max_tokens": tokens}])
    generate_cmd = [P2PR, "generate", "Once upon a time, far away", "--model", str(tiny_dir)]
    generate_cmd += ["--raw", "--nodes", "3", "--max-tokens", str(tokens)]
    generate_cmd += ["--temp", str(case["temp"]), "--seed", str(case["seed"])]

    def p2pr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([P2PR, *args], capture_output=True, text=True, timeout=300, env=env)

    up = p2pr("pipeline", "up", "--model", str(tiny_dir), "--nodes", "3")
    assert up.returncode == 0, up.stderr
    try:
        state = running_cluster(tiny_dir, 3, tmp_path)
        assert state is not None
        victim, survivors = state["pids"][1], [state["pids"][0], state["pids"][2]]
        # Unbuffered: communicate() below reads the pipe itself, past any buffer.
        proc = subprocess.Popen(
            generate_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0
        )
        assert proc.stdout is not None
        first = proc.stdout.read(1)  # the text is streaming
        os.kill(victim, signal.SIGKILL)
        rest, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        assert (first + rest).decode() == expected["text"] + "\n"
        assert "failover" in err.decode()

        status = p2pr("pipeline", "status", "--json")
        [row] = json.loads(status.stdout)
        assert row["running"] and row["serving"] == 2, row
        assert row["pids"] == survivors, row
        assert [r[0] for r in row["layers"]] == [0, row["layers"][0][1]], row
        assert row["layers"][-1][1] == 8, row
        text = p2pr("pipeline", "status").stdout
        assert "running: 2 of 3 nodes" in text and "gone" not in text, text

        joined = p2pr(*generate_cmd[1:], "--json")
        assert joined.returncode == 0, joined.stderr
        result = json.loads(joined.stdout.strip().splitlines()[-1])
        assert "joined the running pipeline" in joined.stderr
        assert result["token_ids"] == expected["token_ids"]
        assert [s["pid"] for s in result["stages"]] == survivors
        assert result["failovers"] == []
        assert all(process_runs(pid) for pid in survivors)
    finally:
        down = p2pr("pipeline", "down", "--model", str(tiny_dir), "--nodes", "3")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
