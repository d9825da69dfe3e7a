"""The OpenAI-compatible API through the official `openai` client, over HTTP on 127.0.0.1.

Against a real 2-stage pipeline of a tiny seeded mlx-lm model (text token for token equal
to single-process mlx-lm; a disconnect frees the KV caches on every stage), and against an
in-process double backend (`ScriptedBackend`: a real tokenizer and detokenizer over a fixed
token script) for the error cases, parameters, stop strings and cancellation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from support import expected_deltas

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.tokens import TokenChunk, TokenStreamWriter
from p2pr.api import ApiSettings, PipelineBackend, TokenizerPrompts, create_app, serve_app
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster

SCRIPT = "Hello wörld 🙂 the capital of France is Paris. The end."
USER = [{"role": "user", "content": "What is the capital of France?"}]
WAIT = 30  # the bound on every wait for an event


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    return load_tokenizer(tiny_dir)


class ScriptedBackend(TokenizerPrompts):
    """Streams the tokens of `SCRIPT`, then end-of-sequence; records what it was asked and
    when its streams were closed. `hold_after`: stop producing after that many chunks
    until closed; `fail_after`: raise after that many; `gate`: streams wait until that
    many are open at once."""

    model_id = "tiny-double"

    def __init__(self, tokenizer: Any, max_context: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.script = tokenizer.encode(SCRIPT, add_special_tokens=False)
        self.calls: list[dict[str, Any]] = []
        self.closed_early = 0
        self.closed = trio.Event()
        self.open = 0
        self.hold_after: int | None = None
        self.fail_after: int | None = None
        self.gate = 1
        self._gate_open = trio.Event()

    def health(self) -> dict[str, Any]:
        return {"double": True}

    async def stream(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        temp: float,
        top_p: float,
        seed: int | None,
    ) -> AsyncGenerator[TokenChunk, None]:
        self.calls.append(
            {"prompt_ids": list(prompt_ids), "max_tokens": max_tokens, "temp": temp, "top_p": top_p, "seed": seed}
        )  # fmt: skip
        writer = TokenStreamWriter(f"r{len(self.calls)}", self.tokenizer)
        tokens = [*self.script, self.tokenizer.eos_token_id][:max_tokens]
        finished = False
        self.open += 1
        try:
            if self.open >= self.gate:
                self._gate_open.set()
            await self._gate_open.wait()
            for i, token in enumerate(tokens):
                if i == self.hold_after:
                    await trio.sleep_forever()
                if i == self.fail_after:
                    raise RuntimeError("stage 1 is on fire")
                last = i == len(tokens) - 1
                reason = ("stop" if i == len(self.script) else "length") if last else None
                yield writer.chunk(token, reason)
                await trio.lowlevel.checkpoint()
            finished = True
        finally:
            self.open -= 1
            if not finished:
                self.closed_early += 1
                self.closed.set()


def script_texts(tokenizer: Any, tokens: Sequence[int], finish: str | None = "length") -> list[str]:
    """Each token's text from mlx-lm's streaming detokenizer, the last finishing the stream."""
    writer = TokenStreamWriter("x", tokenizer)
    return [
        writer.chunk(t, finish if i == len(tokens) - 1 else None).text for i, t in enumerate(tokens)
    ]


@asynccontextmanager
async def serving(backend: Any, **settings: Any) -> AsyncIterator[tuple[str, Any]]:
    """The API over `backend` on 127.0.0.1 (a free port): its base URL and the app."""
    app = create_app(backend, ApiSettings(**settings))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_app, app, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{port}", app
        finally:
            nursery.cancel_scope.cancel()


def client_for(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=WAIT * 4)


async def stream_chat(
    client: openai.AsyncOpenAI, model: str, **options: Any
) -> tuple[list[str], list[Any]]:
    """The content deltas of a streamed chat completion, and all its chunks."""
    deltas: list[str] = []
    chunks: list[Any] = []
    stream = await client.chat.completions.create(model=model, stream=True, **options)
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    return deltas, chunks


# -- against the double backend ---------------------------------------------------------------


async def test_chat_and_completions_with_usage_and_max_tokens(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    async with serving(backend) as (url, _):
        client = client_for(url)
        prompt_ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
        done = await client.chat.completions.create(
            model="tiny-double", messages=USER, max_tokens=40
        )
        assert done.choices[0].message.content == SCRIPT
        assert done.choices[0].finish_reason == "stop"  # the script's end-of-sequence
        assert backend.calls[-1]["prompt_ids"] == prompt_ids
        n = len(backend.script) + 1
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt_ids), n)
        assert done.usage.total_tokens == len(prompt_ids) + n

        deltas, chunks = await stream_chat(
            client,
            "tiny-double",
            messages=USER,
            max_tokens=5,
            stream_options={"include_usage": True},
        )
        assert deltas == [t for t in script_texts(tokenizer, backend.script[:5]) if t]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert all(c.usage is None for c in chunks[:-1])
        _, plain = await stream_chat(client, "tiny-double", messages=USER, max_tokens=5)
        assert (
            all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
        )

        text = await client.completions.create(
            model="tiny-double", prompt="The capital", max_tokens=3
        )
        assert (
            text.choices[0].text == "".join(script_texts(tokenizer, backend.script[:3]))
            and text.choices[0].finish_reason == "length"
        )
        assert backend.calls[-1]["prompt_ids"] == tokenizer.encode("The capital")
        pieces = []
        stream = await client.completions.create(
            model="tiny-double",
            prompt="The capital",
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            pieces.extend(c.text for c in chunk.choices)
            usage = chunk.usage
        assert "".join(pieces) == SCRIPT and usage.completion_tokens == n
        # No limit asked: what is left of the 64-token context.
        assert backend.calls[-1]["max_tokens"] == 64 - len(tokenizer.encode("The capital"))
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-double"]
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{url}/health")).json()
        assert health["status"] == "ok" and health["backend"] == {"double": True}
        await client.close()


async def test_sampling_parameters_reach_the_backend(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    async with serving(backend) as (url, _):
        client = client_for(url)
        await client.chat.completions.create(
            model="tiny-double", messages=USER, max_tokens=2, temperature=0.7, top_p=0.9, seed=11
        )
        await client.chat.completions.create(
            model="tiny-double", messages=USER, max_tokens=2, temperature=1
        )
        await client.chat.completions.create(
            model="tiny-double", messages=USER, max_completion_tokens=3
        )
        await client.close()
    first, unseeded, greedy = backend.calls
    assert (first["temp"], first["top_p"], first["seed"], first["max_tokens"]) == (0.7, 0.9, 11, 2)
    assert unseeded["temp"] == 1.0 and isinstance(unseeded["seed"], int)
    assert (greedy["temp"], greedy["seed"], greedy["max_tokens"]) == (0.0, None, 3)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stop", "before"),
    [("capital", "Hello wörld 🙂 the "), (["nowhere", "France is", "The end"], "Hello wörld 🙂 the capital of "), ("ld 🙂 th", "Hello wör")],
)  # fmt: skip
async def test_stop_strings_end_the_text_and_cancel_upstream(
    tokenizer: Any, stop: Any, before: str, stream: bool
) -> None:
    backend = ScriptedBackend(tokenizer)
    async with serving(backend) as (url, _):
        client = client_for(url)
        if stream:
            deltas, chunks = await stream_chat(client, "tiny-double", messages=USER, stop=stop)
            text, finish = "".join(deltas), chunks[-1].choices[0].finish_reason
        else:
            done = await client.chat.completions.create(
                model="tiny-double", messages=USER, stop=stop
            )
            text, finish, usage = (
                done.choices[0].message.content,
                done.choices[0].finish_reason,
                done.usage,
            )
        await client.close()
    assert (text, finish) == (before, "stop")
    assert backend.closed_early == 1  # the rest of the script was never asked for
    if not stream:
        # The tokens up to the one that completed the stop string.
        stops = [stop] if isinstance(stop, str) else stop
        texts = script_texts(tokenizer, backend.script, None)
        count = next(
            n for n in range(len(texts) + 1) if any(s in "".join(texts[:n]) for s in stops)
        )
        assert usage.completion_tokens == count


async def test_errors_in_openai_shape(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer, max_context=24)
    async with serving(backend) as (url, _):
        client = client_for(url)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4", messages=USER)
        assert (
            missing.value.body["code"] == "model_not_found"
            and missing.value.body["param"] == "model"
        )
        long = [{"role": "user", "content": "the capital of France " * 20}]
        with pytest.raises(openai.BadRequestError) as too_long:
            await client.chat.completions.create(model="tiny-double", messages=long)
        assert too_long.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="maximum context length is 24"):
            await client.completions.create(model="tiny-double", prompt="Hi", max_tokens=100)
        for bad, param in [
            ({"max_tokens": 0}, "max_tokens"),
            ({"temperature": 5}, "temperature"),
            ({"n": 3}, "n"),
        ]:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model="tiny-double", messages=USER, **bad)
            assert caught.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="unrecognized request argument"):
            await client.chat.completions.create(
                model="tiny-double", messages=USER, extra_body={"bogus": 1}
            )
        await client.close()
        async with httpx.AsyncClient(base_url=url) as http:
            for body in (b"{not json", b"[1]", b""):
                reply = await http.post("/v1/chat/completions", content=body)
                assert reply.status_code == 400
                assert reply.json()["error"]["type"] == "invalid_request_error"
            reply = await http.post("/v1/completions", content=b"x" * (5 * 1024 * 1024))
            assert reply.status_code == 413
            assert (await http.get("/v1/nothing")).json()["error"]["message"].startswith("Unknown")
            assert (await http.get("/v1/chat/completions")).status_code == 405
    assert backend.calls == []


async def test_bearer_key_is_required_when_given(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    async with serving(backend, api_key="sk-right") as (url, _):
        client = client_for(url, "sk-wrong")
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
        assert caught.value.body["code"] == "invalid_api_key"
        await client.close()
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"{url}/v1/models")
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "missing_api_key"
            basic = await http.get(f"{url}/v1/models", headers={"Authorization": "Basic sk-right"})
            assert basic.status_code == 401
            assert (await http.get(f"{url}/health")).status_code == 200
        client = client_for(url, "sk-right")
        done = await client.completions.create(model="tiny-double", prompt="Hi", max_tokens=2)
        assert done.usage.completion_tokens == 2
        await client.close()


async def test_a_backend_failure_is_an_error_not_a_short_text(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    backend.fail_after = 3
    async with serving(backend) as (url, _):
        client = client_for(url)
        with pytest.raises(openai.InternalServerError, match="on fire"):
            await client.chat.completions.create(model="tiny-double", messages=USER)
        with pytest.raises(openai.APIError, match="on fire"):
            await stream_chat(client, "tiny-double", messages=USER)
        await client.close()


async def test_a_client_disconnect_cancels_the_request_upstream(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    backend.hold_after = 3
    async with serving(backend, max_in_flight=1) as (url, app):
        client = client_for(url)
        stream = await client.chat.completions.create(
            model="tiny-double", messages=USER, stream=True
        )
        with trio.fail_after(WAIT):
            async for chunk in stream:
                if chunk.choices[0].delta.content:
                    break
            # One request in flight is the limit set here: another is turned away.
            with pytest.raises(openai.RateLimitError):
                await client.completions.create(model="tiny-double", prompt="Hi")
            await stream.close()
            await backend.closed.wait()
            while app.state.api.in_flight:
                await trio.sleep(0.01)
        assert backend.closed_early == 1
        # Not streamed: the client gives up waiting (its read times out) and goes.
        backend.closed = trio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(WAIT, read=0.5)) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json={"model": "tiny-double", "prompt": "Hi"})
        with trio.fail_after(WAIT):
            await backend.closed.wait()
        assert backend.closed_early == 2
        await client.close()


async def test_several_requests_at_once(tokenizer: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    backend.gate = 6  # no stream produces a token before all six are open
    texts: dict[int, str] = {}
    async with serving(backend) as (url, _):
        client = client_for(url)

        async def one(i: int) -> None:
            if i % 2:
                deltas, _ = await stream_chat(
                    client, "tiny-double", messages=USER, max_tokens=4 + i
                )
                texts[i] = "".join(deltas)
            else:
                done = await client.completions.create(
                    model="tiny-double", prompt="Hi", max_tokens=4 + i
                )
                texts[i] = done.choices[0].text

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
        await client.close()
    assert texts == {i: "".join(script_texts(tokenizer, backend.script[: 4 + i])) for i in range(6)}


# -- against a real 2-stage pipeline ----------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_dir: Path) -> Iterator[StageCluster]:
    with StageCluster(tiny_dir, 2) as cluster:
        yield cluster


@asynccontextmanager
async def pipeline_api(
    cluster: StageCluster, model_dir: Path
) -> AsyncIterator[tuple[PipelineClient, openai.AsyncOpenAI]]:
    async with PipelineClient.connect(cluster.addrs, model_dir) as pipe:
        async with serving(PipelineBackend.for_model(pipe, model_dir, "tiny")) as (url, _):
            client = client_for(url)
            yield pipe, client
            await client.close()


@pytest.mark.multinode
async def test_pipeline_text_equals_mlx_lm_token_for_token(
    pipeline: StageCluster, tiny_dir: Path, tokenizer: Any
) -> None:
    prompts = ["The capital of France is", "Once upon a time"]
    chat_ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    cases = [
        {"prompt_ids": chat_ids, "max_tokens": 24},
        {"prompt_ids": chat_ids, "max_tokens": 16, "temp": 0.9, "seed": 7},
        {
            "prompt_ids": tokenizer.encode(prompts[0]),
            "max_tokens": 20,
            "temp": 1.2,
            "top_p": 0.8,
            "seed": 99,
        },
        {"prompt_ids": tokenizer.encode(prompts[1]), "max_tokens": 20},
    ]
    reference = run_reference(tiny_dir, cases)
    got: dict[str, Any] = {}
    async with pipeline_api(pipeline, tiny_dir) as (_, client):

        async def chat_stream() -> None:
            got["chat_stream"] = await stream_chat(
                client,
                "tiny",
                messages=USER,
                max_tokens=24,
                temperature=0,
                stream_options={"include_usage": True},
            )

        async def chat_sampled(key: str) -> None:
            got[key] = await client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=16, temperature=0.9, seed=7
            )

        async def completion_stream() -> None:
            pieces = []
            stream = await client.completions.create(
                model="tiny",
                prompt=prompts[0],
                max_tokens=20,
                temperature=1.2,
                top_p=0.8,
                seed=99,
                stream=True,
            )
            async for chunk in stream:
                pieces.extend(c.text for c in chunk.choices if c.text)
            got["completion_stream"] = pieces

        async def completion() -> None:
            got["completion"] = await client.completions.create(
                model="tiny", prompt=prompts[1], max_tokens=20
            )

        with trio.fail_after(WAIT * 4):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat_stream)
                nursery.start_soon(chat_sampled, "sampled")
                nursery.start_soon(chat_sampled, "sampled_again")
                nursery.start_soon(completion_stream)
                nursery.start_soon(completion)
    deltas, chunks = got["chat_stream"]
    assert deltas == expected_deltas(tokenizer, reference[0])
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)
    assert chunks[-1].usage.completion_tokens == len(reference[0]["token_ids"])
    sampled = got["sampled"].choices[0].message.content
    assert sampled == reference[1]["text"] == got["sampled_again"].choices[0].message.content
    assert got["sampled"].usage.completion_tokens == len(reference[1]["token_ids"])
    assert got["completion_stream"] == expected_deltas(tokenizer, reference[2])
    assert got["completion"].choices[0].text == reference[3]["text"]


@pytest.mark.multinode
async def test_pipeline_stop_and_disconnect_free_every_stage(
    pipeline: StageCluster, tiny_dir: Path, tokenizer: Any
) -> None:
    prompt = "Each node runs layers"
    (reference,) = run_reference(
        tiny_dir, [{"prompt_ids": tokenizer.encode(prompt), "max_tokens": 40}]
    )
    stop = reference["text"][12:16]
    async with pipeline_api(pipeline, tiny_dir) as (pipe, client):
        done = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, stop=stop
        )
        assert done.choices[0].text == reference["text"][: reference["text"].find(stop)]
        assert done.choices[0].finish_reason == "stop"
        before = await pipe.stats()
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=1500, stream=True
        )
        with trio.fail_after(WAIT):
            seen = 0
            async for chunk in stream:
                seen += bool(chunk.choices[0].text)
                if seen == 3:
                    break
            await stream.close()
            stages = await drained(pipe)
    finished = {n["name"]: n["work"]["finished"] for n in before["nodes"] if n["name"] != "client"}
    # Released, not finished: the request was cancelled on every stage.
    assert {n["name"]: n["work"]["finished"] for n in stages} == finished
    assert all(n["work"]["in_flight"] == 0 for n in stages)


async def drained(pipe: PipelineClient) -> list[dict[str, Any]]:
    """The stages' counters once none has a request in flight (KV caches held)."""
    while True:
        stats = await pipe.stats()
        stages = [n for n in stats["nodes"] if n["name"] != "client"]
        if len(stages) == 2 and all(n["work"]["in_flight"] == 0 for n in stages):
            return stages
        await trio.sleep(0.05)
