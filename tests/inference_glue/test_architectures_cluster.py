"""Architectures other than llama through real stage node processes, and the `p2pr` commands'
answers to a model they cannot run.

- gemma3_text as Gemma-3 checkpoints are saved (no `lm_head`: the embedding is the head), with
  sliding-window layers exceeded by the prompt, on 3 nodes, every token's LM head split
  between the first and last stage; the middle node is SIGKILLed mid-generation and the
  request is replayed on the two left. Token for token mlx-lm's single-process output.
- an architecture outside the tested list: refused in one line; with
  `--allow-untested-architecture` it runs and `p2pr generate` checks it against mlx-lm.
- `p2pr generate` and `p2pr verify` on bad input: one line on stderr, no traceback.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from inference_glue.client import GenerationResult, PipelineClient, StageFailedError, load_tokenizer
from inference_glue.footprint import ModelFootprint
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.messages import Failure
from inference_glue.tiny_architectures import UNSUPPORTED, build_architecture
from inference_glue.tokens import TokenChunk
from p2pr.cli import main as cli_main
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster
from p2pr.stage_node import HEAD_SPLIT_ENV
from p2pr.verify import (
    CHECK_TOKENS,
    VerifyCase,
    _row,
    check_first_tokens,
    run_cases_or_errors,
)

TOKENS = 48
P2PR = [sys.executable, "-m", "p2pr"]


def p2pr(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*P2PR, *args], capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent
    )


def assert_one_line_error(code: int, stderr: str, command: str, text: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"p2pr {command}:")]
    assert len(lines) == 1 and text in lines[0], stderr


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`p2pr ARGS` in this process (an uncaught exception fails the test): exit code, stderr."""
    try:
        code = cli_main(list(args))
    except SystemExit as exit:
        code = int(exit.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.multinode
def test_gemma3_split_head_and_failover_replay_equal_single_process(tmp_path: Path) -> None:
    model_dir = build_architecture(tmp_path / "gemma3", "gemma3_text tied", seed=3)
    assert ModelFootprint.from_dir(model_dir).head_split > 0  # the head is split
    prompt = prompt_token_ids(load_tokenizer(model_dir), "Once upon a time, far away")
    assert len(prompt) > 8  # beyond the sliding window
    case = {"prompt_ids": prompt, "max_tokens": TOKENS, "temp": 0.8, "seed": 11}
    expected = run_reference(model_dir, [case])[0]
    at = random.Random(time.time_ns()).randrange(1, TOKENS - 8)
    print(f"SIGKILL of the middle stage after token {at}")

    async def stream(cluster: StageCluster) -> tuple[list[TokenChunk], PipelineClient]:
        chunks: list[TokenChunk] = []
        async with PipelineClient.connect(cluster.addrs, model_dir) as client:
            stream = client.stream(prompt, TOKENS, temp=0.8, seed=11)
            async for chunk in stream:
                chunks.append(chunk)
                if chunk.seq == at:
                    cluster.kill(1)
        return chunks, client

    with StageCluster(model_dir, 3, extra_env={HEAD_SPLIT_ENV: "fixed"}) as cluster:
        middle = cluster.nodes[1].node_id
        chunks, client = anyio.run(stream, cluster)
    assert [c.seq for c in chunks] == list(range(TOKENS))
    assert [c.token_id for c in chunks] == expected["token_ids"]
    assert "".join(c.text for c in chunks) == expected["text"]
    [recovery] = client.recoveries
    assert recovery.lost == (middle,) and len(recovery.route) == 2


@pytest.mark.multinode
def test_untested_architecture_refused_or_checked_against_mlx_lm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = build_architecture(tmp_path / "moe", UNSUPPORTED)
    for args in (["generate", "Once upon a time"], ["verify"]):
        code, err = run_in_process(capsys, *args, "--model", str(model_dir))
        assert_one_line_error(code, err, args[0], "model_type 'granitemoe' is not supported")
        assert "granite, llama" in err
    # The flag reaches the nodes through the environment: a process of its own.
    allowed = p2pr(
        *("generate", "Once upon a time", "--model", str(model_dir), "--raw"),
        *("--max-tokens", "12", "--temp", "0.8", "--seed", "5", "--allow-untested-architecture"),
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "not a tested architecture" in allowed.stderr
    assert "the first 12 tokens are identical to single-process mlx-lm" in allowed.stderr


def test_generate_and_verify_say_what_is_wrong_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = build_architecture(tmp_path / "qwen2", "qwen2")
    cases = [
        (["generate", "", "--raw"], model_dir, "the prompt has no tokens"),
        (["generate", "hi"], tmp_path / "nowhere", "no config.json"),
        (["verify"], tmp_path / "nowhere", "no config.json"),
        (["generate", "hi", "--max-tokens", "0"], model_dir, "--max-tokens must be at least 1"),
    ]
    for args, path, text in cases:
        code, err = run_in_process(capsys, *args, "--model", str(path))
        assert_one_line_error(code, err, args[0], text)
    (model_dir / "tokenizer.json").rename(tmp_path / "moved.json")
    for args in (["generate", "hi"], ["verify"]):
        code, err = run_in_process(capsys, *args, "--model", str(model_dir))
        assert_one_line_error(code, err, args[0], "has no tokenizer")
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    code, err = run_in_process(capsys, "verify", "--model", str(model_dir))
    assert_one_line_error(code, err, "verify", "cannot load the tokenizer")


async def test_a_failed_request_is_a_verify_row_naming_the_stage_and_peer() -> None:
    """A stage failure of one request (injected: a client whose second request fails as a
    stage reports it) is that request's row; the others complete (no exception group)."""
    done = GenerationResult("a", (1, 2), (5, 6), "xy", "length", (), 0.1, 0.2)

    @attrs.define
    class FailingSecond:
        calls: int = 0

        async def generate(self, prompt_ids: list[int], max_tokens: int, **_: Any) -> Any:
            self.calls += 1
            if prompt_ids == [9]:
                raise StageFailedError(Failure("b", 1, "12D3KooWpeer", "mask shape (1, 9)"))
            await anyio.sleep(0)
            return done

    requests = [{"prompt_ids": p, "max_tokens": 2} for p in ([1, 2], [9], [1, 2])]
    results = await run_cases_or_errors(FailingSecond(), requests)  # type: ignore[arg-type]
    assert results[0] == results[2] == done
    assert results[1] == (
        "StageFailedError: request 'b' failed on stage 1 (peer 12D3KooWpeer): mask shape (1, 9)"
    )
    row = _row(VerifyCase("p", "p", "greedy"), 1, {"token_ids": [5, 6], "text": "xy"}, results[1])
    assert not row["identical"] and row["error"] == results[1] and row["pipeline_tokens"] == 0
    assert _row(VerifyCase("p", "p", "greedy"), 2, {"token_ids": [5, 6], "text": "xy"}, done)[
        "identical"
    ]


def test_the_untested_check_finds_the_first_different_token(tmp_path: Path) -> None:
    model_dir = build_architecture(tmp_path / "qwen2", "qwen2")
    prompt = prompt_token_ids(load_tokenizer(model_dir), "Once upon a time")
    request = {"prompt_ids": prompt, "temp": 0.8, "seed": 5, "top_p": 1.0}
    right = run_reference(model_dir, [{**request, "max_tokens": 20}])[0]["token_ids"]
    assert check_first_tokens(model_dir, request, right) == (CHECK_TOKENS, None)
    wrong = [*right[:3], (right[3] + 1) % 100, *right[4:]]
    assert check_first_tokens(model_dir, request, wrong[:6]) == (6, 3)
