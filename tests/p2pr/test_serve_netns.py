"""`p2pr serve` on three "machines": network namespaces on a bridged LAN (tests/netns.py),
each with its own private address and a 1 Gbit/s link, each running `p2pr serve` of the
tiny 8-layer model.

The first machine runs the API. Started with no cluster secret off loopback, it makes one
(kept 0600) and prints the join command; the other machines run that command (one as
printed, listening on 0.0.0.0, one bound to its own address) and the plan spreads the
layers over the three. The official `openai` client in the root namespace streams a chat
completion from the first machine's API: the text equals single-process mlx-lm token for
token, also when another machine's node is SIGKILLed mid-stream (failed over: no gap, no
duplicate); a client that disconnects mid-stream leaves no request (no KV cache) on any
stage; `p2pr generate --join` one node's address works too. In a second case the machines
find each other by mDNS.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from netns import Machine, NetnsLan
from support import expected_deltas

from inference_glue.client import PipelineClient, load_tokenizer, peer_id_of
from inference_glue.failover import FailoverPolicy
from p2pr.launch import Launched
from p2pr.reference import run_reference
from router import EngineConfig, Router, RouterConfig

pytestmark = pytest.mark.multinode

P2PR = str(Path(sys.executable).parent / "p2pr")
WAIT = 120.0  # the bound on every wait for an event
KEY = "sk-test-serve"
USER = [{"role": "user", "content": "What do three machines say?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_8_layers: Path) -> Any:
    return load_tokenizer(tiny_8_layers)


def serve(lan: NetnsLan, machine: Machine, logs: Path, args: Sequence[str]) -> Launched:
    """`p2pr serve ARGS` inside `machine` (a new identity each time); up once ready."""
    process = lan.launch(
        machine,
        [P2PR, "serve", "--identity", "none", *args],
        label=f"p2pr serve on machine {machine.index}",
        log_path=logs / f"serve-{machine.index}.log",
    )
    process.expect("ready", WAIT)
    return process


def plan_with(process: Launched, nodes: set[str]) -> dict[str, Any]:
    """The first `plan` event of the API node whose stages are exactly `nodes`."""
    return process.expect(
        lambda line: (
            line.get("event") == "plan" and {s["node_id"] for s in line["stages"]} == nodes
        ),
        WAIT,
    )


def api_client(machine: Machine, api: dict[str, Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://{machine.address}:{api['port']}/v1",
        api_key=KEY,
        max_retries=0,
        timeout=WAIT,
    )


@asynccontextmanager
async def stats_client(
    lan: NetnsLan, model_dir: Path, secret: str, addrs: Sequence[str]
) -> AsyncIterator[PipelineClient]:
    """A client in the root namespace that only reads the stage nodes' counters."""
    engine = EngineConfig(
        listen_host=lan.gateway, bootstrap=tuple(addrs), cluster_secret=secret.encode()
    )
    router = Router.create(config=RouterConfig(engine=engine))
    peers = [peer_id_of(a) for a in addrs]
    policy = FailoverPolicy(enabled=False)
    async with PipelineClient.over(
        router, peers, model_dir, keep_plan=False, policy=policy, timeout=WAIT
    ) as client:
        yield client


async def stream_chat(
    client: openai.AsyncOpenAI, max_tokens: int, after: int = 0, then: Any = None
) -> tuple[list[str], Any]:
    """The content deltas of a streamed chat completion and its usage; `then()` is called
    once `after` deltas have come."""
    deltas: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
            if len(deltas) == after and then is not None:
                then()
    return deltas, usage


def join_args(join: dict[str, Any], model_dir: Path) -> list[str]:
    """The arguments of the join command the first node printed, with this test's model
    path (the command names the model as the first node was given it)."""
    argv = shlex.split(join["command"])
    assert argv[:2] == ["p2pr", "serve"]
    return [*argv[2:], "--model", str(model_dir)]


async def test_three_machines_by_bootstrap_with_failover_and_disconnect(
    lan: NetnsLan, tmp_path: Path, tiny_8_layers: Path, tokenizer: Any
) -> None:
    first, second, third = lan.machines
    secret_file = tmp_path / "cluster.secret"
    api_node = serve(
        lan,
        first,
        tmp_path,
        [
            "--model", str(tiny_8_layers), "--model-name", "tiny", "--memory-budget", "2G",
            "--listen", f"/ip4/{first.address}/tcp/0", "--secret-file", str(secret_file),
            "--api-port", "0", "--api-host", first.address, "--api-key", KEY,
        ],
    )  # fmt: skip
    # No secret given off loopback: one was made, kept private, and the join command has it.
    secret = secret_file.read_text().strip()
    assert len(secret) == 64 and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    join = api_node.expect("join", WAIT)
    args = join_args(join, tiny_8_layers)
    assert args[args.index("--cluster-secret") + 1] == secret
    assert args[args.index("--bootstrap") + 1].startswith(f"/ip4/{first.address}/tcp/")
    args += ["--memory-budget", "1G"]  # half the first machine's: a quarter of the layers each
    joined = serve(lan, second, tmp_path, args)  # as printed: on 0.0.0.0
    bound = serve(lan, third, tmp_path, [*args, "--listen", f"/ip4/{third.address}/tcp/0"])
    nodes = [api_node, joined, bound]
    ready = [n.expect("ready", WAIT) for n in nodes]
    for machine, line in zip(lan.machines, ready):
        assert all(f"/ip4/{machine.address}/tcp/" in a for a in line["addrs"]), line
    plan = plan_with(api_node, {r["node_id"] for r in ready})
    assert plan["stages"][0]["node_id"] == ready[0]["node_id"]
    assert [s["layers"] for s in plan["stages"]] == [[0, 4], [4, 6], [6, 8]]

    chat_ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    reference = run_reference(tiny_8_layers, [{"prompt_ids": chat_ids, "max_tokens": 300}])[0]
    api = api_node.expect("api", WAIT)
    client = api_client(first, api)
    victim = ready[2]
    with trio.fail_after(WAIT * 2):
        deltas, usage = await stream_chat(
            client, 300, after=5, then=lambda: os.kill(victim["pid"], signal.SIGKILL)
        )
    assert deltas == expected_deltas(tokenizer, reference)
    assert usage.prompt_tokens == len(chat_ids)
    assert usage.completion_tokens == len(reference["token_ids"])
    # The node was lost during the request, which resumed on the two machines left.
    failover = api_node.expect("failover", WAIT)
    assert failover["lost"] == [victim["node_id"]] and failover["resumed_from"] >= 5
    plan_with(api_node, {ready[0]["node_id"], ready[1]["node_id"]})

    # A client that disconnects mid-stream: the request is released on every stage.
    survivors = [ready[0]["addrs"][0], ready[1]["addrs"][0]]
    await disconnect_frees_every_stage(lan, tiny_8_layers, secret, survivors, client)
    await client.close()
    # `p2pr generate --join` one node of the cluster (the root namespace is another machine).
    joined = subprocess.run(
        [P2PR, "generate", USER[0]["content"], "--model", str(tiny_8_layers), "--max-tokens",
         "16", "--join", survivors[1], "--cluster-secret", secret, "--json"],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["token_ids"] == reference["token_ids"][:16]


async def disconnect_frees_every_stage(
    lan: NetnsLan, model_dir: Path, secret: str, addrs: Sequence[str], client: openai.AsyncOpenAI
) -> None:
    """A stream closed after 3 chunks leaves no request on the stages at `addrs`, and
    none of them counts it as finished (it was released, not run to its end)."""
    async with stats_client(lan, model_dir, secret, addrs) as stats:
        before = await stats.stats()
        with trio.fail_after(WAIT):
            stream = await client.completions.create(
                model="tiny", prompt="Each machine holds", max_tokens=1500, stream=True
            )
            seen = 0
            async for chunk in stream:
                seen += bool(chunk.choices[0].text)
                if seen == 3:
                    break
            await stream.close()
            stages = await drained(stats, len(addrs))
    finished = {n["name"]: n["work"]["finished"] for n in before["nodes"] if n["name"] != "client"}
    assert {n["name"]: n["work"]["finished"] for n in stages} == finished


async def drained(stats: PipelineClient, count: int) -> list[dict[str, Any]]:
    """The stages' counters once none of the `count` holds a request (its KV caches)."""
    while True:
        report = await stats.stats()
        stages = [n for n in report["nodes"] if n["name"] != "client"]
        if len(stages) == count and all(n["work"]["in_flight"] == 0 for n in stages):
            return stages
        await trio.sleep(0.05)


async def test_three_machines_by_mdns(
    lan: NetnsLan, tmp_path: Path, tiny_8_layers: Path, tokenizer: Any
) -> None:
    secret = "mdns-" + os.urandom(8).hex()  # nodes of other runs on the LAN are not let in
    common = ["--model", str(tiny_8_layers), "--mdns", "--cluster-secret", secret]
    api = [
        "--model-name", "tiny", "--api-port", "0", "--api-host", lan.machines[0].address,
        "--api-key", KEY,
    ]  # fmt: skip
    # The last machine listens on every interface: it announces its address, not 0.0.0.0.
    listen = [f"/ip4/{m.address}/tcp/0" for m in lan.machines[:2]] + ["/ip4/0.0.0.0/tcp/0"]
    nodes = [
        serve(lan, machine, tmp_path, [*common, "--listen", where, *(api if i == 0 else [])])
        for i, (machine, where) in enumerate(zip(lan.machines, listen))
    ]
    ready = [n.expect("ready", WAIT) for n in nodes]
    for machine, line in zip(lan.machines, ready):
        assert all(f"/ip4/{machine.address}/tcp/" in a for a in line["addrs"]), line
    plan_with(nodes[0], {r["node_id"] for r in ready})
    chat_ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    reference = run_reference(tiny_8_layers, [{"prompt_ids": chat_ids, "max_tokens": 40}])[0]
    client = api_client(lan.machines[0], nodes[0].expect("api", WAIT))
    with trio.fail_after(WAIT):
        deltas, usage = await stream_chat(client, 40)
    assert deltas == expected_deltas(tokenizer, reference)
    assert usage.completion_tokens == len(reference["token_ids"])
    await client.close()
