"""The examples (examples/*.py) and the stage nodes' shared health, with the tiny model.

One kept 3-node pipeline (`p2pr pipeline up`, recorded in a temporary cache folder) serves
`p2pr health --once --json` without arguments, the chat example (which joins it) and the
reference generations (a `PipelineClient` in this process); the two-node example starts a
pair of its own. Greedy generation is bit-identical whatever the number of stages (see
`p2pr verify`), so the 3-stage pipeline is the reference for the 2-stage example too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from discovery.share import SHARE_HEALTH_ENV, sharing_enabled
from inference_glue.client import GenerationResult, PipelineClient, load_tokenizer
from p2pr.kept import running_cluster

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
P2PR = str(Path(sys.executable).parent / "p2pr")
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run(
    args: Sequence[str], cache_dir: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """A command with the temporary cache folder (where kept pipelines are recorded)."""
    env = {**os.environ, "P2PR_CACHE_DIR": str(cache_dir)}
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


@pytest.fixture(scope="module")
def kept(tiny_dir: Path, cache_dir: Path) -> Iterator[dict[str, Any]]:
    """A kept 3-node pipeline of the tiny model: its record (pids, node ids, addrs)."""
    up = run([P2PR, "pipeline", "up", "--model", str(tiny_dir), "--nodes", "3"], cache_dir)
    assert up.returncode == 0, up.stderr
    try:
        state = running_cluster(tiny_dir, 3, cache_dir)
        assert state is not None
        yield state
    finally:
        down = run([P2PR, "pipeline", "down", "--model", str(tiny_dir), "--nodes", "3"], cache_dir)
        assert down.returncode == 0, down.stderr


def reference(
    state: dict[str, Any], model_dir: Path, prompts: Sequence[Sequence[int]]
) -> list[GenerationResult]:
    """What a PipelineClient gets from the kept pipeline for each prompt (greedy)."""

    async def main() -> list[GenerationResult]:
        async with PipelineClient.connect(state["addrs"], model_dir) as client:
            return [await client.generate(p, MAX_TOKENS) for p in prompts]

    return anyio.run(main)


def load_example(name: str) -> ModuleType:
    """An example script as a module (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_real_generation(result: dict[str, Any], eos: set[int]) -> None:
    """The asked number of tokens, or fewer ending at end of sequence."""
    tokens = result["token_ids"]
    if result["finish_reason"] == "length":
        assert len(tokens) == MAX_TOKENS
    else:
        assert result["finish_reason"] == "stop" and tokens[-1] in eos
        assert 0 < len(tokens) <= MAX_TOKENS


def test_stage_nodes_health_views_reach_p2pr_health(kept: dict[str, Any], cache_dir: Path) -> None:
    """`p2pr health --once --json`, without arguments, finds the kept pipeline; every stage
    node publishes its view, labelled with its stage, listing the two other stages."""
    stages = kept["node_ids"]

    def snapshot() -> dict[str, Any] | None:
        out = run([P2PR, "health", "--once", "--json", "--wait", "8"], cache_dir, timeout=60)
        assert out.returncode == 0, out.stderr
        nodes: dict[str, Any] = json.loads(out.stdout)["nodes"]
        complete = set(stages) <= set(nodes) and all(
            {p["peer"] for p in nodes[s]["peers"] if not p.get("observer")} >= set(stages) - {s}
            for s in stages
        )
        return nodes if complete else None

    deadline = time.monotonic() + 40
    nodes = snapshot()
    while nodes is None and time.monotonic() < deadline:
        time.sleep(1)  # views are published every second
        nodes = snapshot()
    assert nodes is not None, "not every stage node's view reached p2pr health"
    assert [nodes[s]["label"] for s in stages] == ["stage 0", "stage 1", "stage 2"]
    assert {nodes[s]["role"] for s in stages} == {"stage"}


def test_three_node_chat_streams_the_pipeline_answers_with_health(
    kept: dict[str, Any], tiny_dir: Path, cache_dir: Path
) -> None:
    chat = [sys.executable, str(EXAMPLES / "three_node_chat.py"), "--model", str(tiny_dir)]
    chat += ["--max-tokens", str(MAX_TOKENS), "--prompt", "Hello!", "--prompt", "Tell me more."]
    out = run([*chat, "--json"], cache_dir)
    assert out.returncode == 0, out.stderr
    assert "joining the kept pipeline" in out.stderr
    turns = [json.loads(line) for line in out.stdout.splitlines()]
    assert [t["prompt"] for t in turns] == ["Hello!", "Tell me more."]

    tokenizer = load_tokenizer(tiny_dir)
    eos = set(tokenizer.eos_token_ids)
    # The second turn's prompt is the whole conversation, in the chat template.
    second = tokenizer.decode(turns[1]["prompt_ids"])
    assert "Hello!" in second and turns[0]["text"] in second and "Tell me more." in second
    expected = reference(kept, tiny_dir, [t["prompt_ids"] for t in turns])
    for turn, want in zip(turns, expected):
        assert_real_generation(turn, eos)
        assert turn["token_ids"] == list(want.token_ids)
        assert turn["text"] == want.text
        # The health line names every stage node (this client's view of each).
        assert [h["peer"] for h in turn["health"]] == kept["node_ids"]
        for index, node_id in enumerate(kept["node_ids"]):
            assert f"stage {index} …{node_id[-6:]}" in turn["health_line"]

    # Without --json (and without a terminal): the same text streamed after "bot> ", then
    # the health line.
    plain = run(chat, cache_dir)
    assert plain.returncode == 0, plain.stderr
    for turn in turns:
        assert f"you> {turn['prompt']}\nbot> {turn['text']}\n     health: stage 0 …" in plain.stdout

    # The clients that left (two chats, the reference) are flagged as observers in the
    # stages' views, so that `p2pr health` does not list them as dead nodes.
    out = run([P2PR, "health", "--once", "--json"], cache_dir, timeout=60)
    views = json.loads(out.stdout)["nodes"]
    for node_id in kept["node_ids"]:
        others = [p for p in views[node_id]["peers"] if p["peer"] not in kept["node_ids"]]
        assert len(others) >= 3 and all(p["observer"] for p in others), others


def test_health_sharing_can_be_turned_off() -> None:
    assert sharing_enabled({}) and sharing_enabled({SHARE_HEALTH_ENV: "1"})
    assert not any(sharing_enabled({SHARE_HEALTH_ENV: v}) for v in ("0", "off", "False", " no "))


def test_health_without_a_cluster_to_find_says_how(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "P2PR_BOOTSTRAP_PEERS"}
    env["P2PR_CACHE_DIR"] = str(tmp_path)  # no kept pipeline recorded there
    out = subprocess.run([P2PR, "health", "--once"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "--bootstrap" in out.stderr and "p2pr pipeline up" in out.stderr


def test_two_node_pipeline_example(
    kept: dict[str, Any], tiny_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "The capital of France is"
    example = [sys.executable, str(EXAMPLES / "two_node_pipeline.py"), prompt, "--json"]
    out = run([*example, "--model", str(tiny_dir), "--max-tokens", str(MAX_TOKENS)], cache_dir)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])

    assert_real_generation(result, set(load_tokenizer(tiny_dir).eos_token_ids))
    [want] = reference(kept, tiny_dir, [result["prompt_ids"]])
    assert result["token_ids"] == list(want.token_ids)
    assert result["text"] == want.text
    # Two nodes of its own (not the kept ones), each with half of the 6 layers.
    placement = result["placement"]
    assert [(p["stage"], p["layers"]) for p in placement] == [(0, [0, 3]), (1, [3, 6])]
    assert not {p["node_id"] for p in placement} & set(kept["node_ids"])
    assert all(p["addr"].endswith(p["node_id"]) for p in placement)

    load_example("two_node_pipeline").print_placement(result)
    printed = capsys.readouterr().out
    assert "stage 0: embedding, layers 0-2" in printed
    assert "stage 1: layers 3-5, norm + LM head + sampling" in printed


def test_failover_demo_survives_a_sigkill_mid_answer(tiny_dir: Path, cache_dir: Path) -> None:
    demo = [sys.executable, str(EXAMPLES / "failover_demo.py"), "--model", str(tiny_dir)]
    out = run([*demo, "--kill-after", "10", "--max-tokens", "32", "--temp", "0.8"], cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[SIGKILL stage 1]" in out.stdout
    assert "event: lost: peer=" in out.stdout and "stage=1" in out.stdout
    # Tokens already on their way when the node died may arrive before the failover.
    replayed = re.search(r"(\d+) tokens replayed", out.stdout)
    assert replayed is not None and int(replayed.group(1)) >= 10
    assert "identical to single-device mlx-lm: yes" in out.stdout
