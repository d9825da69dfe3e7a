"""`p2pr bench api`: the OpenAI-compatible API against `p2pr generate` on the same local
2-node pipeline, and against `mlx_lm.server` in one process; aggregate tokens/s with 1, 4
and 8 concurrent streaming clients.

Two `p2pr serve` nodes on 127.0.0.1 with equal memory budgets (2 stages), the first with the
API. This process reaches the one pipeline both ways, in interleaved runs (generate, API,
generate, API, …) after one warm-up run of each: as `p2pr generate --join` does (a
`PipelineClient` of its own, here, joining the two nodes) and through the API (the official
`openai` client streaming a chat completion). Both send the same prompt (the chat
template's rendering), greedy. Then 1, 4 and 8 clients stream through the API at once.
Then the nodes stop and `mlx_lm.server` serves the model alone (with the nodes' BLAS set-up),
measured the same way through its API.

Per way: the median over the runs of the decode tokens/s (the tokens after the first, per
second from the first to the last) and of the time to the first token, with their min and
max; whether every run's text was the same. Through an API the first token is the first
chunk with text (the API leaves out empty deltas): with a model whose first tokens decode to
no text yet (the tiny random model's partial UTF-8), its TTFT is later and its decode span
shorter than `generate`'s. Per concurrency: the aggregate tokens/s (all
streams' tokens over the wall time) and the median time to the first token.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from inference_glue.blas import node_environment
from inference_glue.client import PipelineClient, load_tokenizer, peer_id_of
from inference_glue.tokens import decode_rate
from router import EngineConfig, Router, RouterConfig

from ..launch import Launched, python_module, stop_all
from .repeats import median_and_spread

__all__ = ["CONCURRENCY", "GOAL_API", "bench_api"]

GOAL_API = 0.97  # the API's decode tokens/s against `p2pr generate`'s on the same pipeline
CONCURRENCY = (1, 4, 8)
MODEL_ID = "bench"
WAIT = 300.0


@attrs.frozen
class _Case:
    """What every way runs: the prompt (as messages and as token ids), greedy."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    max_tokens: int
    runs: int


@attrs.frozen
class Run:
    """One generation as its caller saw it."""

    ttft_s: float
    last_s: float  # from the request to the last token
    tokens: int
    text: str

    @property
    def decode(self) -> float | None:
        return decode_rate(self.tokens, self.ttft_s, self.last_s)


async def stream_api(
    client: Any, model: str, messages: list[dict[str, str]], max_tokens: int
) -> Run:
    """One streamed chat completion through an OpenAI-compatible API (`openai.AsyncOpenAI`)."""
    start = time.perf_counter()
    first = last = start
    pieces: list[str] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            if not pieces:
                first = last
            pieces.append(chunk.choices[0].delta.content)
    return Run(first - start, last - start, tokens, "".join(pieces))


def summary(way: str, runs: Sequence[Run]) -> dict[str, Any]:
    """Medians, min and max of the decode tokens/s and of the time to the first token."""
    decode = [d for d in (r.decode for r in runs) if d is not None]
    decode_median, decode_spread = median_and_spread(decode, 2)
    ttft_median, ttft_spread = median_and_spread((r.ttft_s * 1000 for r in runs), 1)
    return {
        "way": way,
        "tokens": runs[0].tokens if runs else 0,
        "decode_tokens_per_s": decode_median,
        "decode_min_max": decode_spread,
        "ttft_ms": ttft_median,
        "ttft_min_max_ms": ttft_spread,
        "same_text": len({r.text for r in runs}) == 1,
        "decode_tokens_per_s_runs": [round(d, 2) for d in decode],
    }


async def concurrent_streams(
    client: Any, model: str, messages: list[dict[str, str]], max_tokens: int, clients: int
) -> dict[str, Any]:
    """`clients` streams at once: aggregate tokens/s, median TTFT."""
    runs: list[Run] = []

    async def one() -> None:
        runs.append(await stream_api(client, model, messages, max_tokens))

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one)
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "aggregate_tokens_per_s": round(sum(r.tokens for r in runs) / wall, 2),
        "ttft_ms": round(statistics.median(r.ttft_s for r in runs) * 1000, 1),
        "same_text": len({r.text for r in runs}) == 1,
    }


def _serve_nodes(
    model_dir: Path, say: Callable[[str], None]
) -> tuple[list[Launched], dict[str, Any]]:
    """Two `p2pr serve` nodes on 127.0.0.1, the first with the API; (nodes, its api event)."""
    common = ["--model", str(model_dir), "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", "none"]
    common += ["--memory-budget", "64G"]  # equal: the layers split in half
    first = Launched(
        python_module("p2pr", "serve", *common, "--api-port", "0", "--model-name", MODEL_ID),
        label="p2pr serve (API)",
    )
    nodes = [first]
    try:
        ready = first.expect("ready", WAIT)
        second = Launched(
            python_module("p2pr", "serve", *common, "--bootstrap", ready["addrs"][0]),
            label="p2pr serve",
        )
        nodes.append(second)
        other = second.expect("ready", WAIT)
        say("2 serve nodes: waiting for the plan over both")
        first.expect(lambda e: e.get("event") == "plan" and len(e["stages"]) == 2, WAIT)
        api = first.expect("api", WAIT)
    except BaseException:
        stop_all(nodes)
        raise
    api["addrs"] = [ready["addrs"][0], other["addrs"][0]]
    return nodes, api


async def _measure_pipeline(
    model_dir: Path, api: dict[str, Any], case: _Case, say: Callable[[str], None]
) -> dict[str, Any]:
    import openai

    router = Router.create(config=RouterConfig(engine=EngineConfig(bootstrap=tuple(api["addrs"]))))
    peers = [peer_id_of(a) for a in api["addrs"]]
    http = openai.AsyncOpenAI(base_url=api["url"], api_key="none", max_retries=0, timeout=WAIT)
    async with PipelineClient.over(router, peers, model_dir, keep_plan=False) as client:

        async def generate() -> Run:
            result = await client.generate(case.prompt_ids, case.max_tokens)
            last = result.elapsed_s
            return Run(result.ttft_s, last, len(result.token_ids), result.text)

        async def through_api() -> Run:
            return await stream_api(http, MODEL_ID, case.messages, case.max_tokens)

        ways: dict[str, list[Run]] = {"generate": [], "api": []}
        say(f"pipeline: warm-up, then {case.runs} interleaved runs of generate and the API")
        await generate()
        await through_api()
        for _ in range(case.runs):
            ways["generate"].append(await generate())
            ways["api"].append(await through_api())
        concurrency = []
        for clients in CONCURRENCY:
            say(f"pipeline: {clients} streaming clients at once")
            concurrency.append(
                await concurrent_streams(http, MODEL_ID, case.messages, case.max_tokens, clients)
            )
    await http.close()
    return {"ways": ways, "concurrency": concurrency}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _measure_mlx_server(
    model_dir: Path, case: _Case, say: Callable[[str], None]
) -> list[Run]:
    """`mlx_lm.server` alone, with the nodes' BLAS set-up: warm-up, then the runs."""
    import openai

    port = _free_port()
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(port)]
    say("mlx_lm.server: starting")
    server = subprocess.Popen(
        argv, env=node_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    http = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=WAIT
    )
    try:
        await _until_up(port, server)
        say(f"mlx_lm.server: warm-up, then {case.runs} runs")
        await stream_api(http, "default_model", case.messages, case.max_tokens)
        return [
            await stream_api(http, "default_model", case.messages, case.max_tokens)
            for _ in range(case.runs)
        ]
    finally:
        await http.close()
        server.terminate()
        server.wait(timeout=30)


async def _until_up(port: int, server: subprocess.Popen[bytes]) -> None:
    """Until the server accepts connections (bounded by WAIT); it loads the model before."""
    with anyio.fail_after(WAIT):
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with status {server.returncode}")
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.2)
                continue
            await stream.aclose()
            return


def bench_api(
    model_dir: Path,
    *,
    prompt: str = "Tell me a story about three machines.",
    max_tokens: int = 64,
    runs: int = 5,
    mlx_server: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); the JSON-ready result."""
    say = progress or (lambda _: None)
    messages = [{"role": "user", "content": prompt}]
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [
        int(t) for t in tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ]
    case = _Case(messages, prompt_ids, max_tokens, runs)
    say("starting 2 p2pr serve nodes")
    nodes, api = _serve_nodes(model_dir, say)
    try:
        measured = _run(_measure_pipeline, model_dir, api, case, say)
    finally:
        stop_all(nodes)
    rows = [
        summary("p2pr generate (2 stages)", measured["ways"]["generate"]),
        summary("API (2 stages)", measured["ways"]["api"]),
    ]
    if mlx_server:
        rows.append(
            summary("mlx_lm.server (1 process)", _run(_measure_mlx_server, model_dir, case, say))
        )
    generate, through_api = rows[0]["decode_tokens_per_s"], rows[1]["decode_tokens_per_s"]
    ratio = round(through_api / generate, 3) if generate and through_api else None
    texts = {r.text for way in measured["ways"].values() for r in way}
    return {
        "model": model_dir.name,
        "prompt_tokens": len(prompt_ids),
        "max_tokens": max_tokens,
        "runs": runs,
        "rows": rows,
        "api_vs_generate": ratio,
        "goal": f"API decode tokens/s >= {GOAL_API} x p2pr generate's",
        "goal_met": ratio is not None and ratio >= GOAL_API,
        "same_text_both_ways": len(texts) == 1,
        "concurrency": measured["concurrency"],
    }


def _run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return anyio.run(fn, *args, backend="trio")
