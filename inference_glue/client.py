"""The client of a pipeline: submit requests, reassemble the token streams, read counters.

    async with PipelineClient.connect(addrs, model_dir) as client:
        async for chunk in client.stream(prompt_ids, max_tokens=64, temp=0.7, seed=1):
            print(chunk.text, end="", flush=True)
        result = await client.generate(prompt_ids, 32)        # the whole GenerationResult
        report = await client.stats()                         # counters of every node, per link

The client is a router node of its own: it bootstraps from every stage node's address, asks
each what it serves (`InfoQuery`), checks that they form one pipeline (same model files,
contiguous layers covering the model), subscribes to the `TOKENS` topic, and sends requests to
the first stage. The chunks of each request go through a `TokenStreamAssembler` (order,
duplicates, checksums, joined text against `tokenizer.decode`); a stream that cannot be
completed (a stage failed or left, the protocol gave up on a chunk, or nothing came for
`idle_timeout`) raises `TokenStreamError`, which names the missing seq ranges and the stage
and peer the chunks come from: never a silently short text.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from inference_glue.local_pipeline import DEFAULT_PREFILL_STEP_SIZE
from inference_glue.messages import (
    CHUNK_DELIVERY,
    CHUNK_STREAM,
    CLIENT_STREAM,
    CONTROL_STREAM,
    REQUEST_STREAM,
    TOKENS,
    Failure,
    GenerateRequest,
    InfoQuery,
    InfoReply,
    MessageDecodeError,
    Release,
    RequestMeta,
    StatsQuery,
    StatsReply,
    decode_message,
    encode_message,
)
from inference_glue.node import engine_call, router_counters
from inference_glue.sampling import SamplingParams
from inference_glue.tokens import (
    IncompleteStreamError,
    TextMismatchError,
    TokenChunk,
    TokenChunkDecodeError,
    TokenStreamAssembler,
    TokenStreamWriter,
)
from p2p_reliable import Gap, Unrecoverable
from router import DirectMessage, EngineConfig, FaultConfig, Receiver, Router, RouterConfig

__all__ = [
    "LINK_COUNTERS",
    "GenerationResult",
    "PipelineClient",
    "PipelineError",
    "StageFailedError",
    "StageInfo",
    "TokenStreamError",
    "load_tokenizer",
    "peer_id_of",
]

# How token chunks reach this client unless a request says otherwise (see messages.py):
# straight to the requester. Measured faster than the topic (no gossipsub signing, checking
# and forwarding per chunk: 3.5 vs 4.0 ms of messaging per token, tiny model, 2 stages), no
# subscription race, and no client receives (or is slowed by) other clients' streams.
DEFAULT_CHUNKS = "direct"

CHUNK_STREAMS = (TOKENS.topic, CHUNK_STREAM)

# Per-peer health counters shown for each link (node -> peer).
LINK_COUNTERS = (
    "checksum_failures",
    "decode_errors",
    "retransmits",
    "nacks_sent",
    "nacks_received",
    "losses",
    "unrecoverable",
)


class PipelineError(RuntimeError):
    """The nodes do not form a usable pipeline, or a node is unreachable or gone."""


class StageFailedError(RuntimeError):
    """A stage reported that it could not serve the request."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(
            f"request {failure.request_id!r} failed on stage {failure.stage} "
            f"(peer {failure.peer}): {failure.message}"
        )


class TokenStreamError(IncompleteStreamError):
    """A token stream that cannot be completed, with the reason; names the missing seq
    ranges and the stage and peer that publish the stream."""

    def __init__(self, base: IncompleteStreamError, reason: str) -> None:
        self.request_id = base.request_id
        self.missing = base.missing
        self.finished = base.finished
        self.source = base.source
        self.reason = reason
        Exception.__init__(self, f"{base}; {reason}")


@attrs.frozen
class StageInfo:
    """One stage of the pipeline, as its node describes itself."""

    index: int
    node_id: str
    layers: range
    num_layers: int
    model: str
    fingerprint: str
    blas: str
    blas_threads: str | None
    pid: int

    @property
    def label(self) -> str:
        """'stage 1 (12D3KooW…)'."""
        return f"stage {self.index} ({self.node_id})"


@attrs.frozen
class GenerationResult:
    """One finished request, as the client saw it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    chunks: tuple[TokenChunk, ...]
    ttft_s: float
    elapsed_s: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second from the first to the last."""
        if len(self.token_ids) < 2 or self.elapsed_s <= self.ttft_s:
            return None
        return (len(self.token_ids) - 1) / (self.elapsed_s - self.ttft_s)


def peer_id_of(addr: str) -> str:
    """The peer id at the end of a multiaddr '/ip4/…/tcp/…/p2p/<id>'."""
    _, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer:
        raise ValueError(f"multiaddr {addr!r} has no /p2p/<peer id>")
    return peer


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's tokenizer (mlx-lm's TokenizerWrapper), without loading any weights."""
    from mlx_lm.utils import load_tokenizer as _load

    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text())
    return _load(path, eos_token_ids=config.get("eos_token_id"))


class PipelineClient:
    """Requests to a running pipeline over a running router (see `connect`)."""

    def __init__(
        self,
        router: Router,
        tokenizer: Any,
        stages: Sequence[StageInfo] = (),
        *,
        chunks: str = DEFAULT_CHUNKS,
    ) -> None:
        if chunks not in CHUNK_DELIVERY:
            raise ValueError(f"chunks must be one of {CHUNK_DELIVERY}, got {chunks!r}")
        self.router = router
        self.chunks = chunks
        self.tokenizer = tokenizer
        self.stages = list(stages)
        self._streams: dict[str, MemoryObjectSendStream[TokenChunk | Failure]] = {}
        self._replies: dict[int, InfoReply | StatsReply | None] = {}
        self._reply_events: dict[int, anyio.Event] = {}
        self._nonces = itertools.count(1)
        self.bad_messages = 0

    # -- connecting ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        addrs: Sequence[str],
        model_dir: str | Path,
        *,
        faults: str | None = None,
        timeout: float = 60.0,
        chunks: str = DEFAULT_CHUNKS,
    ) -> AsyncIterator[PipelineClient]:
        """Join the pipeline whose nodes listen at `addrs` (one multiaddr per node is
        enough); `model_dir` gives the tokenizer. `faults`: this client's fault shim.
        `chunks`: how token chunks come by default, "direct" or "topic"."""
        peers = list(dict.fromkeys(peer_id_of(a) for a in addrs))
        config = RouterConfig(
            engine=EngineConfig(faults=FaultConfig.parse(faults) if faults else None)
        )
        router = Router.create(bootstrap_peers=list(addrs), config=config)
        await router.register_topic(TOKENS)
        topic_chunks = router.receiver(TOKENS)
        replies = router.direct_receiver(CLIENT_STREAM)
        direct_chunks = router.direct_receiver(CHUNK_STREAM)
        tokenizer = await anyio.to_thread.run_sync(load_tokenizer, model_dir)
        client = cls(router, tokenizer, chunks=chunks)
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(router.run)
            tg.start_soon(client._dispatch_chunks, topic_chunks)
            tg.start_soon(client._dispatch_direct_chunks, direct_chunks)
            tg.start_soon(client._dispatch_replies, replies)
            try:
                await client._join(peers, timeout)
                yield client
                # Leave politely: what we sent is acknowledged and our own acks are out, so
                # the nodes do not retransmit to (and give up on) a peer that left.
                with anyio.move_on_after(2):
                    await router.drain()
                    await anyio.sleep(0.05)
            except BaseException as exc:  # re-raised below, unwrapped from the task group
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _join(self, peers: list[str], timeout: float) -> None:
        router = self.router
        with anyio.move_on_after(timeout):
            await router.wait_ready()
            while not set(peers) <= router.connected:
                await anyio.sleep(0.02)
        missing = [p for p in peers if p not in router.connected]
        if missing:
            raise PipelineError(f"could not connect within {timeout:.0f} s to node(s) {missing}")
        infos = await self._query(peers, InfoQuery, timeout)
        self.stages = check_pipeline(infos)
        last = self.stages[-1]
        with anyio.move_on_after(timeout):
            while last.node_id not in router.subscribers(TOKENS.topic):
                await anyio.sleep(0.02)
        if last.node_id not in router.subscribers(TOKENS.topic):
            raise PipelineError(
                f"the last stage, {last.label}, did not subscribe to {TOKENS.topic} "
                f"within {timeout:.0f} s"
            )

    async def _query(
        self, peers: Sequence[str], kind: type[InfoQuery] | type[StatsQuery], timeout: float
    ) -> list[Any]:
        nonces = []
        for peer in peers:
            nonce = next(self._nonces)
            self._reply_events[nonce] = anyio.Event()
            self._replies[nonce] = None
            nonces.append(nonce)
            await self.router.send_to(peer, CONTROL_STREAM, encode_message(kind(nonce)))
        try:
            with anyio.move_on_after(timeout):
                for nonce in nonces:
                    await self._reply_events[nonce].wait()
            silent = [p for p, n in zip(peers, nonces) if self._replies[n] is None]
            if silent:
                raise PipelineError(f"node(s) {silent} did not answer within {timeout:.0f} s")
            return [self._replies[n] for n in nonces]
        finally:
            for nonce in nonces:
                self._replies.pop(nonce, None)
                self._reply_events.pop(nonce, None)

    # -- dispatch --------------------------------------------------------------------------

    async def _dispatch_chunks(self, chunks: Receiver[TokenChunk]) -> None:
        async for chunk in chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is not None:  # other clients' requests are not ours
                stream.send_nowait(chunk)

    async def _dispatch_direct_chunks(self, items: Receiver[DirectMessage]) -> None:
        async for item in items:
            try:
                # Unverified here: the assembler checks the checksum and counts failures.
                chunk = TokenChunk.from_bytes(item.payload, verify=False)
            except TokenChunkDecodeError:
                self.bad_messages += 1
                continue
            stream = self._streams.get(chunk.request_id)
            if stream is not None:
                stream.send_nowait(chunk)

    async def _dispatch_replies(self, replies: Receiver[DirectMessage]) -> None:
        async for item in replies:
            try:
                message = decode_message(item.payload)
            except MessageDecodeError:
                self.bad_messages += 1
                continue
            if isinstance(message, InfoReply | StatsReply):
                if message.nonce in self._reply_events:
                    self._replies[message.nonce] = message
                    self._reply_events[message.nonce].set()
            elif isinstance(message, Failure):
                stream = self._streams.get(message.request_id)
                if stream is not None:
                    stream.send_nowait(message)
            else:
                self.bad_messages += 1

    # -- requests --------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt, as `stream_generate` encodes a string."""
        from inference_glue.local_pipeline import prompt_token_ids

        return prompt_token_ids(self.tokenizer, prompt)

    async def stream(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        temp: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        request_id: str | None = None,
        idle_timeout: float = 120.0,
        chunks: str | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Submit one request and yield its chunks in order as they become complete.

        Raises:
            StageFailedError: a stage could not serve the request.
            TokenStreamError: the stream cannot be completed (see the module docstring).
            TextMismatchError: the joined text differs from the tokenizer's decoding.
        """
        SamplingParams(temp=temp, top_p=top_p, seed=seed)  # validates
        if not self.stages:
            raise PipelineError("not connected to a pipeline")
        rid = request_id or uuid.uuid4().hex[:16]
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in flight")
        route = tuple(s.node_id for s in self.stages)
        meta = RequestMeta(
            rid,
            max_tokens,
            temp,
            top_p,
            seed,
            prefill_step_size,
            route,
            self.router.node_id,
            chunks or self.chunks,
        )
        last = self.stages[-1]
        # The text is checked below against mlx-lm's own streaming detokenizer (what
        # stream_generate yields), not against tokenizer.decode: the two differ for a NUL byte.
        assembler = TokenStreamAssembler(rid, source=last.label)
        send, recv = anyio.create_memory_object_stream[TokenChunk | Failure](float("inf"))
        self._streams[rid] = send
        known_events = {id(e) for e in self.router.protocol_events}
        progress = time.monotonic()
        try:
            request = GenerateRequest(meta, tuple(prompt_ids))
            await self.router.send_to(route[0], REQUEST_STREAM, encode_message(request))
            while not assembler.complete:
                item: TokenChunk | Failure | None = None
                with anyio.move_on_after(0.25):
                    item = await recv.receive()
                if isinstance(item, Failure):
                    raise StageFailedError(item)
                if item is None:
                    reason = self._stream_trouble(known_events, progress, idle_timeout)
                    if reason is not None:
                        try:
                            assembler.finish()
                        except IncompleteStreamError as exc:
                            raise TokenStreamError(exc, reason) from None
                    continue
                progress = time.monotonic()
                for chunk in assembler.add(item):
                    yield chunk
            check_stream_text(self.tokenizer, assembler)
        finally:
            del self._streams[rid]
            if not assembler.complete:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    for peer in route:
                        if peer in self.router.connected:
                            payload = encode_message(Release(rid, "abandoned by the client"))
                            await self.router.send_to(peer, CONTROL_STREAM, payload)

    def _stream_trouble(self, known: set[int], progress: float, idle_timeout: float) -> str | None:
        """Why the current stream cannot complete, or None while it still may."""
        gone = [s.label for s in self.stages if s.node_id not in self.router.connected]
        if gone:
            return f"lost the connection to {', '.join(gone)}"
        last = self.stages[-1].node_id
        for event in list(self.router.protocol_events):
            if id(event) in known:
                continue
            if isinstance(event, Gap) and event.origin == last and event.stream in CHUNK_STREAMS:
                return f"the protocol reported a gap in the token chunks from {last}: {event}"
            if isinstance(event, Unrecoverable):
                return f"the protocol gave up on a message: {event}"
        if time.monotonic() - progress > idle_timeout:
            return f"no token chunk for {idle_timeout:.0f} s"
        return None

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        **options: Any,
    ) -> GenerationResult:
        """Run one request to the end (options as for `stream`)."""
        start = time.perf_counter()
        first: float | None = None
        chunks: list[TokenChunk] = []
        rid = options.pop("request_id", None) or uuid.uuid4().hex[:16]
        async for chunk in self.stream(prompt_ids, max_tokens, request_id=rid, **options):
            if first is None:
                first = time.perf_counter()
            chunks.append(chunk)
        end = time.perf_counter()
        return GenerationResult(
            request_id=rid,
            prompt_ids=tuple(prompt_ids),
            token_ids=tuple(c.token_id for c in chunks),
            text="".join(c.text for c in chunks),
            finish_reason=chunks[-1].finish_reason if chunks else None,
            chunks=tuple(chunks),
            ttft_s=(first or end) - start,
            elapsed_s=end - start,
        )

    # -- counters --------------------------------------------------------------------------

    def names(self) -> dict[str, str]:
        """Peer id -> 'stage i' / 'client'."""
        names = {s.node_id: f"stage {s.index}" for s in self.stages}
        names[self.router.node_id] = "client"
        return names

    async def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """Every node's counters (and this client's), and one row per link node -> peer.

        A link row's counters are what `node` recorded about `peer`: `checksum_failures`
        are frames from the peer that failed their checksum here, `retransmits` are
        messages this node sent the peer again, `nacks_sent` holes it asked the peer to fill.
        """
        replies: list[StatsReply] = await self._query(
            [s.node_id for s in self.stages], StatsQuery, timeout
        )
        own = await engine_call(self.router, router_counters(self.router))
        names = self.names()
        nodes: list[dict[str, Any]] = [
            {
                "name": names[r.node_id],
                "node_id": r.node_id,
                "protocol": r.protocol,
                "shim": r.shim,
                "peers": r.peers,
                "work": r.work,
            }
            for r in replies
        ]
        nodes.append(
            {
                "name": "client",
                "node_id": self.router.node_id,
                "protocol": own["protocol"],
                "shim": own["shim"],
                "peers": own["peers"],
                "work": {"bad_messages": self.bad_messages},
            }
        )
        links = []
        for node in nodes:
            for peer, health in node["peers"].items():
                if peer not in names:
                    continue
                row: dict[str, Any] = {
                    "node": node["name"],
                    "peer": names[peer],
                    "node_id": node["node_id"],
                    "peer_id": peer,
                }
                row.update({name: health.get(name, 0) for name in LINK_COUNTERS})
                p50 = health.get("rtt_p50")
                row["rtt_p50_ms"] = None if p50 is None else round(p50 * 1000, 3)
                links.append(row)
        return {"nodes": nodes, "links": links}


def check_stream_text(tokenizer: Any, assembler: TokenStreamAssembler) -> str:
    """The complete stream's text, after checking every chunk's text against what mlx-lm's
    streaming detokenizer (stream_generate's) gives for the same token ids.

    Raises:
        IncompleteStreamError: the stream is not complete.
        TextMismatchError: some chunk's text differs.
    """
    text = assembler.finish()
    replay = TokenStreamWriter(assembler.request_id, tokenizer)
    chunks = assembler.chunks
    expected = [replay.chunk(c.token_id, c.finish_reason).text for c in chunks]
    if expected != [c.text for c in chunks]:
        raise TextMismatchError(assembler.request_id, text, "".join(expected))
    return text


def check_pipeline(infos: Sequence[InfoReply]) -> list[StageInfo]:
    """The stages in order, after checking that the nodes form one pipeline."""
    if not infos:
        raise PipelineError("no stage nodes")
    stages = sorted(
        (
            StageInfo(
                index=i.stage,
                node_id=i.node_id,
                layers=range(i.layer_start, i.layer_stop),
                num_layers=i.num_layers,
                model=i.model,
                fingerprint=i.model_fingerprint,
                blas=i.blas,
                blas_threads=i.blas_threads,
                pid=i.pid,
            )
            for i in infos
        ),
        key=lambda s: s.layers.start,
    )
    described = ", ".join(
        f"{s.label}: layers {s.layers.start}-{s.layers.stop - 1} of {s.num_layers} "
        f"of {s.model} [{s.fingerprint}]"
        for s in stages
    )
    if len({(s.fingerprint, s.num_layers) for s in stages}) != 1:
        raise PipelineError(f"the nodes do not serve the same model files: {described}")
    expected = 0
    for position, stage in enumerate(stages):
        if stage.layers.start != expected or stage.index != position:
            raise PipelineError(f"the nodes do not form one pipeline: {described}")
        expected = stage.layers.stop
    if expected != stages[0].num_layers or len(stages) != infos[0].num_stages:
        raise PipelineError(f"the nodes do not cover the whole model: {described}")
    if len({(s.blas, s.blas_threads) for s in stages}) != 1:
        raise PipelineError(
            "the nodes use different BLAS set-ups, so results would not be bit-exact: "
            + ", ".join(f"{s.label}: {s.blas} x{s.blas_threads}" for s in stages)
        )
    return stages
