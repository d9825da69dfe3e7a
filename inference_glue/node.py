"""A pipeline stage node: one OS process that serves one contiguous range of a model's layers.

    python -m inference_glue.node --model DIR --layers 0:15 --stage 0 --stages 2 \\
        [--bootstrap MULTIADDR ...] [--faults drop=0.1,corrupt=0.05] [--compute inline|thread]
        [--memory-budget 2G] [--corrupt-activations 0.5]

It starts a `Router`, prints one JSON line `{"event": "listening", "node_id", "addrs", ...}`,
loads its stage with `load_stage` (only its own weights), prints `{"event": "ready", ...}` and
serves requests until its standard input closes (or, with `--detach`, until SIGTERM/SIGINT).
A node that cannot start prints `{"event": "error", "message": ...}` and exits with status 1.

How a request flows (see `inference_glue.messages` for the streams):

1. The client sends `GenerateRequest` to the first stage. The first stage feeds the prompt in
   `generate_step`'s pieces (`prefill_pieces`) and sends each piece's hidden state to the next
   stage as `Activation` (codec bytes: exact dtype, shape, xxh3-64 checksum), the request's
   `RequestMeta` with the first piece.
2. Middle stages run their layers and pass the hidden state on.
3. The last stage turns the logits of the last prompt token (and then of each new token) into a
   token with `sampling.sample` (greedy, or keyed by (seed, position)), sends it back to the
   first stage as `TokenFeedback` at once (the critical path), then hands its `TokenChunk` to
   the requester: sent to it alone (`chunks="direct"`) or published on the `TOKENS` topic.
4. The first stage embeds the token and runs the next step, until the last stage marks the
   token `done` (end of sequence or `max_tokens`); then every stage releases the request's
   KV caches (the last stage sends `Release` to the middle stages).

Failover (driven by the client, see `inference_glue.failover`): a `Reconfigure` gives the node
new layers, stage index and plan epoch; it drops every request in flight, loads the layers from
its own copy of the model (refusing, with a reason, layers beyond its `--memory-budget`) and
answers with its `InfoReply`. A request with `RequestMeta.resume` replays the prompt in the
same prefill pieces and then the resumed tokens one at a time, exactly as the first attempt
computed them, so the KV caches and the next sampled token are bit for bit the same.

Any number of requests may be in flight: each stage keeps KV caches per request id and works
through its messages one at a time, in arrival order. The model compute is synchronous MLX; it
runs inline on the event loop (default; measured faster, see `--compute`) or in a worker
thread with a limiter of one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import attrs
import mlx.core as mx
import xxhash

from inference_glue.blas import blas_in_use
from inference_glue.footprint import ModelFootprint, format_bytes, parse_bytes
from inference_glue.head_split import HeadSplitTuner
from inference_glue.local_pipeline import prefill_pieces
from inference_glue.messages import (
    ACTIVATION_STREAM,
    CHUNK_STREAM,
    CLIENT_STREAM,
    CONTROL_STREAM,
    HEAD_STREAM,
    REQUEST_STREAM,
    TOKEN_STREAM,
    TOKENS,
    Activation,
    Failure,
    GenerateRequest,
    HeadPart,
    HeadShare,
    InfoQuery,
    InfoReply,
    Message,
    MessageDecodeError,
    Reconfigure,
    Release,
    RequestMeta,
    SetFaults,
    StatsQuery,
    StatsReply,
    TokenFeedback,
    decode_message,
    encode_message,
)
from inference_glue.sampling import SamplingParams, logprobs_from_logits, sample
from inference_glue.stage import PipelineStage, load_stage, restage
from inference_glue.tensor_codec import TensorDecodeError, decode_tensor, encode_tensor
from inference_glue.tokens import TokenChunk, TokenStreamWriter
from router import DirectMessage, EngineConfig, FaultConfig, Router, RouterConfig
from router.faults import FAULTS_ENV

__all__ = [
    "COMPUTE_MODES",
    "NodeCounters",
    "StageNode",
    "available_memory",
    "main",
    "model_fingerprint",
    "parse_layers",
]

log = logging.getLogger("p2pr.inference.node")

T = TypeVar("T")

COMPUTE_MODES = ("inline", "thread")
# Messages waiting for the compute worker; beyond this the direct streams hold their senders
# back (the router's flow control), so memory stays bounded.
WORK_QUEUE = 256
# How long the last stage waits for a requester to appear as a subscriber of the token topic
# before it publishes (a chunk published earlier would not be sent to it).
SUBSCRIBER_WAIT = 15.0
# "fixed" in a node's environment: as --head-split fixed (tests that need every token split).
HEAD_SPLIT_ENV = "P2PR_HEAD_SPLIT"


def parse_layers(text: str) -> range:
    """'0:15' -> range(0, 15)."""
    start, sep, stop = text.partition(":")
    if not sep:
        raise ValueError(f"layers must look like START:STOP, got {text!r}")
    return range(int(start), int(stop))


def available_memory() -> int:
    """Bytes of memory available to a new process (Linux MemAvailable), the default memory
    budget of a node; 1 TiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as fd:
            for line in fd:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


class StaleEpochError(ValueError):
    """A request for a plan epoch other than the node's."""


def model_fingerprint(model_dir: str | Path) -> str:
    """xxh3-64 over the model's config, tokenizer and weight files (names and bytes).

    Nodes of one pipeline must load the same model; the client compares fingerprints.
    """
    root = Path(model_dir)
    digest = xxhash.xxh3_64()
    names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    names += sorted(p.name for p in root.glob("*.safetensors"))
    for name in names:
        path = root / name
        if not path.is_file():
            continue
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as fd:
            while block := fd.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def router_counters(router: Router) -> Callable[[], dict[str, Any]]:
    """A function (to run on the engine loop) that snapshots the router's counters."""

    def snapshot() -> dict[str, Any]:
        engine = router.engine
        assert engine is not None
        now = engine._now()
        endpoint = engine.endpoint
        return {
            "protocol": endpoint.stats.as_dict(),
            "shim": attrs.asdict(engine.shim.stats),
            "peers": {s.peer: s.to_dict() for s in endpoint.healths.snapshots(now)},
        }

    return snapshot


class MlxWorker:
    """Where a node runs its MLX work: inline on the event loop, or on one dedicated thread.

    MLX keeps streams per thread, so all of a node's MLX work (loading included) stays on one
    thread: "inline" is the event loop's thread; "thread" is one long-lived worker thread
    (not a pool, whose threads would change between calls).
    """

    def __init__(self, mode: str) -> None:
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {mode!r}")
        self.mode = mode
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx")
            if mode == "thread"
            else None
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the MLX thread; the event loop keeps running meanwhile in "thread"
        mode."""
        if self._executor is None:
            return fn(*args)
        token = anyio.lowlevel.current_token()
        done = anyio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                anyio.from_thread.run_sync(done.set, token=token)

        future = self._executor.submit(fn, *args)
        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    def close(self) -> None:
        """Let the worker thread finish its current call and end."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


@attrs.define
class NodeCounters:
    """What a stage node did, besides what the router counts."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    abandoned: int = 0
    forwards: int = 0
    tokens_sampled: int = 0
    chunks_published: int = 0
    compute_seconds: float = 0.0
    # First stage: from sending a hidden state to be sampled to receiving its token back.
    round_trips: int = 0
    round_trip_seconds: float = 0.0
    bytes_out: int = 0
    tensor_checksum_failures: int = 0
    bad_messages: int = 0
    stale_messages: int = 0
    # The same hidden state or token delivered twice (the router promises exactly once).
    duplicate_deliveries: int = 0
    replayed_tokens: int = 0
    reconfigurations: int = 0
    # Fault injection (--corrupt-activations): hidden states damaged after their checksum.
    activations_corrupted: int = 0
    # First stage, split LM head: parts of the logits computed for the last stage, and the
    # time that took (also in compute_seconds).
    head_parts: int = 0
    head_seconds: float = 0.0


@attrs.define
class _Request:
    meta: RequestMeta
    params: SamplingParams
    writer: TokenStreamWriter | None = None
    generated: int = 0
    # Last stage, split LM head: its own part, until the first stage's part arrives.
    head: _PendingHead | None = None


@attrs.define
class _PendingHead:
    """The last stage's part of a split head: its logits (rows `0 .. rows - 1`, being
    computed from `started`, perf_counter seconds), the input's position and length, and
    whether the tuner times this token."""

    own: mx.array
    position: int
    length: int
    rows: int
    started: float
    timed: bool = False


@attrs.frozen
class _HeadShared:
    """What the last stage's forward gives when the first stage computes part of the head:
    the hidden state to send it, and the rows the last stage computes itself."""

    hidden: bytes
    rows: int


@attrs.frozen
class _Work:
    stream: str
    peer: str
    message: Message


class StageNode:
    """Serves one pipeline stage over a running `Router`.

    Args:
        router: a router that is running (or about to: `serve` waits for it).
        stage: this node's layers (`load_stage`).
        tokenizer: the model's tokenizer (the last stage detokenizes; eos ids).
        stage_index, num_stages: this stage's place in the pipeline.
        model: a name for the model (shown to clients), `fingerprint` its files' hash.
        worker: where the MLX work runs (`MlxWorker`; default inline on the event loop).
        vocab_size: the embedding's rows; prompt token ids are checked against it.
        model_dir: the node's copy of the model, where a `Reconfigure` loads layers from
            (without it the node refuses reconfiguration).
        memory_budget: bytes of weights this node may hold (default: available memory).
        allow_fault_control: obey `SetFaults` (chaos runs; off by default, since any peer
            could otherwise damage this node's traffic).
        corrupt_activations: fault injection: the fraction of outgoing hidden states to
            damage after their checksum is computed (the next stage must catch them).
        adaptive_head_split: as the last stage, move the cut of a split LM head with what
            it measures (`HeadSplitTuner`); False keeps the client's cut for every token.
    """

    def __init__(
        self,
        router: Router,
        stage: PipelineStage,
        tokenizer: Any,
        *,
        stage_index: int,
        num_stages: int,
        model: str,
        fingerprint: str,
        worker: MlxWorker | None = None,
        vocab_size: int | None = None,
        model_dir: str | Path | None = None,
        memory_budget: int | None = None,
        corrupt_activations: float = 0.0,
        fault_seed: int = 0,
        allow_fault_control: bool = False,
        adaptive_head_split: bool = True,
    ) -> None:
        _check_stage(stage, stage_index, num_stages)
        self.router = router
        self.stage = stage
        self.tokenizer = tokenizer
        self.index = stage_index
        self.num_stages = num_stages
        self.model = model
        self.fingerprint = fingerprint
        self.worker = worker or MlxWorker("inline")
        self.vocab_size = vocab_size
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.footprint = ModelFootprint.from_dir(model_dir) if model_dir is not None else None
        self.memory_budget = memory_budget if memory_budget is not None else available_memory()
        self.epoch = 0
        self.corrupt_activations = corrupt_activations
        self.allow_fault_control = allow_fault_control
        self.adaptive_head_split = adaptive_head_split
        self._head_tuner: HeadSplitTuner | None = None
        self._fault_rng = random.Random(fault_seed)
        self.counters = NodeCounters()
        self._eos = set(tokenizer.eos_token_ids)
        self._blas = blas_in_use()
        self._requests: dict[str, _Request] = {}
        self._sent_at: dict[str, float] = {}
        self._local: deque[_Work] = deque()
        self._chunks_send, self._chunks_recv = anyio.create_memory_object_stream[
            tuple[TokenChunk, RequestMeta]
        ](1024)

    @property
    def name(self) -> str:
        """'stage 1 (12D3KooW…)'."""
        return f"stage {self.index} ({self.router.node_id})"

    async def serve(self) -> None:
        """Serve until cancelled. Registers the token topic first on the last stage."""
        if self.stage.is_last and TOKENS.topic not in self.router.topic_routers:
            await self.router.register_topic(TOKENS)
        await self.router.wait_ready()
        work_send, work_recv = anyio.create_memory_object_stream[_Work](WORK_QUEUE)
        async with anyio.create_task_group() as tg:
            for stream in (REQUEST_STREAM, ACTIVATION_STREAM, TOKEN_STREAM, HEAD_STREAM):
                tg.start_soon(self._pump, stream, work_send.clone())
            tg.start_soon(self._control, work_send.clone())
            tg.start_soon(self._worker, work_recv)
            # On every node: a failover may make any of them the last stage.
            tg.start_soon(self._publisher)
            work_send.close()

    # -- inputs ----------------------------------------------------------------------------

    def _decode(self, item: DirectMessage) -> Message | None:
        try:
            return decode_message(item.payload)
        except MessageDecodeError as exc:
            self.counters.bad_messages += 1
            self.router.refused(item.peer, "bad pipeline message", f"on {item.stream}: {exc}")
            return None

    async def _pump(self, stream: str, work: anyio.abc.ObjectSendStream[_Work]) -> None:
        async with work:
            async for item in self.router.direct_receiver(stream):
                message = self._decode(item)
                if message is not None:
                    await work.send(_Work(stream, item.peer, message))

    async def _control(self, work: anyio.abc.ObjectSendStream[_Work]) -> None:
        async with work:
            async for item in self.router.direct_receiver(CONTROL_STREAM):
                message = self._decode(item)
                if isinstance(message, Release | Reconfigure):
                    # Through the worker, so that it never races a computation.
                    await work.send(_Work(item.stream, item.peer, message))
                elif isinstance(message, InfoQuery):
                    await self._reply(item.peer, self.info(message.nonce))
                elif isinstance(message, StatsQuery):
                    await self._reply(item.peer, await self.stats(message.nonce))
                elif isinstance(message, SetFaults):
                    await self._set_faults(message, item.peer)
                elif message is not None:
                    self.counters.bad_messages += 1
                    self.router.refused(
                        item.peer,
                        "unexpected pipeline message",
                        f"{type(message).__name__} on {item.stream}",
                    )

    async def _reply(self, peer: str, message: Message) -> None:
        await self.router.send_to(peer, CLIENT_STREAM, encode_message(message))

    async def _set_faults(self, message: SetFaults, peer: str) -> None:
        error = ""
        engine = self.router.engine
        if not self.allow_fault_control:
            error = "this node does not take fault settings (no --allow-fault-control)"
        elif engine is None:
            error = "the router is not running"
        else:
            try:
                engine.submit_faults(FaultConfig.parse(message.faults))
                engine.submit_partition(set(message.partition))
            except ValueError as exc:
                error = str(exc)
        if error:
            self.counters.bad_messages += 1
            log.warning("%s: fault settings from %s refused: %s", self.name, peer, error)
        else:
            log.warning(
                "%s: faults now %r, partitioned from %s",
                self.name,
                message.faults,
                list(message.partition),
            )
        await self._reply(peer, attrs.evolve(self.info(message.nonce), error=error))

    def info(self, nonce: int = 0) -> InfoReply:
        """What this node serves."""
        return InfoReply(
            nonce=nonce,
            node_id=self.router.node_id,
            stage=self.index,
            num_stages=self.num_stages,
            layer_start=self.stage.layers.start,
            layer_stop=self.stage.layers.stop,
            num_layers=self.stage.num_model_layers,
            model=self.model,
            model_fingerprint=self.fingerprint,
            blas=self._blas.kind,
            blas_threads=self._blas.threads,
            pid=os.getpid(),
            epoch=self.epoch,
            memory_budget=self.memory_budget,
        )

    async def stats(self, nonce: int = 0) -> StatsReply:
        """This node's counters (the router's read on its engine loop)."""
        snap = await self.router.query(router_counters(self.router), timeout=10.0)
        work = attrs.asdict(self.counters)
        work["in_flight"] = len(self._requests)
        if self._head_tuner is not None:
            work["head_split"] = self._head_tuner.as_dict()
        work["bad_payloads"] = dict(self.router.bad_payloads)
        return StatsReply(
            nonce=nonce,
            node_id=self.router.node_id,
            stage=self.index,
            protocol=snap["protocol"],
            shim=snap["shim"],
            peers=snap["peers"],
            work=work,
        )

    # -- the worker ------------------------------------------------------------------------

    async def _worker(self, work: anyio.abc.ObjectReceiveStream[_Work]) -> None:
        async with work:
            while True:
                item = self._local.popleft() if self._local else await work.receive()
                await self._handle(item)

    async def _handle(self, item: _Work) -> None:
        message = item.message
        meta = message.meta if isinstance(message, GenerateRequest | Activation) else None
        request_id = meta.request_id if meta is not None else getattr(message, "request_id", "?")
        try:
            if isinstance(message, GenerateRequest) and item.stream == REQUEST_STREAM:
                await self._start(message, item.peer)
            elif isinstance(message, Activation) and item.stream == ACTIVATION_STREAM:
                await self._activation(message)
            elif isinstance(message, TokenFeedback) and item.stream == TOKEN_STREAM:
                await self._token(message)
            elif isinstance(message, HeadShare) and item.stream == HEAD_STREAM:
                await self._head_share(message, item.peer)
            elif isinstance(message, HeadPart) and item.stream == HEAD_STREAM:
                await self._head_part(message)
            elif isinstance(message, Release):
                self._release(message.request_id)
            elif isinstance(message, Reconfigure):
                await self._reconfigure(message, item.peer)
            else:
                self.counters.bad_messages += 1
                self.router.refused(
                    item.peer,
                    "unexpected pipeline message",
                    f"{type(message).__name__} on {item.stream}",
                )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            kind, suspect = "error", ""
            if isinstance(exc, TensorDecodeError):
                self.counters.tensor_checksum_failures += 1
                kind, suspect = "corrupt", item.peer
                detail = f"hidden state from {item.peer} failed its check: {exc}"
            elif isinstance(exc, StaleEpochError):
                kind, detail = "stale", str(exc)
            else:
                detail = f"{type(exc).__name__}: {exc}"
            log.warning("%s: request %r failed (%s): %s", self.name, request_id, kind, detail)
            await self._fail(request_id, detail, meta, kind, suspect)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return await self.worker.run(fn, *args)
        finally:
            self.counters.compute_seconds += time.perf_counter() - start

    def _compute(
        self, request_id: str, inputs: Sequence[int] | bytes, position: int, sample_it: bool
    ) -> bytes | int | _HeadShared | None:
        """One forward of this stage: codec bytes for the next stage, a sampled token id
        (last stage, `sample_it`), the hidden state for the first stage (last stage,
        `sample_it`, split head) or None (last stage, prefill piece: caches only)."""
        have = self.stage.offset(request_id)
        if have > position:
            self.counters.duplicate_deliveries += 1
        if have != position:
            raise RuntimeError(
                f"request {request_id!r}: this stage holds {have} tokens of KV cache but the "
                f"input starts at position {position}"
            )
        # Arrays are made here, on the MLX thread: MLX streams belong to one thread.
        x = decode_tensor(inputs) if isinstance(inputs, bytes) else mx.array(list(inputs))
        state = self._requests[request_id]
        split, timed = (
            self._head_plan(state.meta, x) if sample_it and self.stage.is_last else (0, False)
        )
        out = self.stage.forward(request_id, x, head=not (split or timed))
        self.counters.forwards += 1
        if not self.stage.is_last:
            return encode_tensor(out)
        if not sample_it:
            # As generate_step does for prefill pieces: evaluate the caches only.
            mx.eval(self.stage.cache_state(request_id))
            return None
        if split:
            # The first stage's part starts when it gets this; ours computes meanwhile.
            shared = _HeadShared(encode_tensor(out), split)
            own = self.stage.head_rows(out, range(0, split))
            mx.async_eval(own)
            state.head = _PendingHead(
                own, position, out.shape[1], split, time.perf_counter(), timed
            )
            return shared
        start = None
        if timed:
            # The whole head here, timed as a split one is: from the final hidden state to
            # the sampled token, for the tuner to compare.
            mx.eval(out)
            start = time.perf_counter()
            out = self.stage.head(out)
        logprobs = logprobs_from_logits(out[:, -1, :])
        token = cast(int, sample(logprobs, state.params, position + out.shape[1]).item())
        if start is not None:
            assert self._head_tuner is not None
            self._head_tuner.observe_whole(time.perf_counter() - start)
        return token

    def _head_plan(self, meta: RequestMeta, inputs: mx.array) -> tuple[int, bool]:
        """For a token the last stage samples: the rows of the head it computes itself while
        the first stage computes the rest (0: no split, it computes them all), and whether
        the tuner times this token's head (decode steps only, on an adaptive node)."""
        if not meta.head_split or self.num_stages < 2:
            return 0, False
        if not self.adaptive_head_split:
            return meta.head_split, False
        # Only the worker calls this and the tuner's observers, one item at a time.
        if self._head_tuner is None:
            self._head_tuner = HeadSplitTuner(self.stage.vocab_size, meta.head_split)
        rows = self._head_tuner.next_rows()
        return (rows if rows < self.stage.vocab_size else 0), inputs.shape[-2] == 1

    def _head_rows_last(self, hidden: bytes, row_start: int) -> bytes:
        """First stage: logits of rows `row_start ..` at the last position, codec bytes."""
        h = decode_tensor(hidden)
        logits = self.stage.head_rows(h, range(row_start, self.stage.vocab_size))
        return encode_tensor(logits[:, -1, :])

    def _sample_joined(
        self, request_id: str, own: mx.array, other: bytes, position: int
    ) -> tuple[int, float]:
        """Last stage: its part of the logits joined with the first stage's, sampled; and
        how long it waited for its own part."""
        start = time.perf_counter()
        mx.eval(own)
        own_wait = time.perf_counter() - start
        part = decode_tensor(other)
        if part.shape[-1] + own.shape[-1] != self.stage.vocab_size:
            raise ValueError(
                f"the first stage's part of the head has {part.shape[-1]} rows; "
                f"{self.stage.vocab_size - own.shape[-1]} were asked"
            )
        logits = mx.concatenate([own[:, -1, :], part], axis=-1)
        state = self._requests[request_id]
        token = cast(int, sample(logprobs_from_logits(logits), state.params, position).item())
        return token, own_wait

    async def _start(self, request: GenerateRequest, peer: str) -> None:
        meta = request.meta
        rid = meta.request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in flight")
        if meta.epoch != self.epoch:
            raise StaleEpochError(
                f"request {rid!r} is for plan epoch {meta.epoch}; this node is at {self.epoch}"
            )
        if len(meta.route) != self.num_stages or meta.route[self.index] != self.router.node_id:
            raise ValueError(
                f"the route {list(meta.route)} does not have this node as stage {self.index} "
                f"of {self.num_stages}"
            )
        if self.vocab_size is not None:
            bad = [t for t in request.prompt_ids + meta.resume if not 0 <= t < self.vocab_size]
            if bad:
                # MLX's embedding lookup would not fail: it would read outside the table.
                raise ValueError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary (0-{self.vocab_size - 1})"
                )
        self._requests[rid] = self._new_request(meta)
        self.counters.requests += 1
        prompt = request.prompt_ids
        pieces = prefill_pieces(len(request.prompt_ids), meta.prefill_step_size)
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1 and not meta.resume
            out = await self._run(
                self._compute, rid, prompt[piece.start : piece.stop], piece.start, last
            )
            await self._emit(meta, out, piece.start, last, first=n == 0)
        # A resumed request: the tokens generated before the failover, one decode step each,
        # as they were first computed (a one-shot prefill would differ in the last bits).
        # Nothing is sampled until the last of them, whose output gives the next new token.
        for i, token in enumerate(meta.resume):
            if rid not in self._requests:
                return  # released meanwhile (a single-stage node samples inline)
            position = len(prompt) + i
            last = i == len(meta.resume) - 1
            out = await self._run(self._compute, rid, [token], position, last)
            self.counters.replayed_tokens += 1
            await self._emit(meta, out, position, last, first=False)

    def _new_request(self, meta: RequestMeta) -> _Request:
        params = SamplingParams(temp=meta.temp, top_p=meta.top_p, seed=meta.seed)
        writer = (
            TokenStreamWriter(meta.request_id, self.tokenizer, meta.resume)
            if self.stage.is_last
            else None
        )
        return _Request(meta, params, writer, generated=len(meta.resume))

    async def _activation(self, act: Activation) -> None:
        rid = act.request_id
        if act.meta is not None:
            if act.meta.epoch != self.epoch:
                # Left over from before a failover: the client has moved on.
                self.counters.stale_messages += 1
                log.info(
                    "%s: activation of %r from epoch %d dropped", self.name, rid, act.meta.epoch
                )
                return
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in flight")
            self._requests[rid] = self._new_request(act.meta)
            self.counters.requests += 1
        state = self._requests.get(rid)
        if state is None:
            self.counters.stale_messages += 1
            log.info("%s: activation for unknown request %r dropped", self.name, rid)
            return
        out = await self._run(self._compute, rid, act.tensor, act.position, act.sample)
        await self._emit(state.meta, out, act.position, act.sample, first=act.meta is not None)

    async def _emit(
        self,
        meta: RequestMeta,
        out: bytes | int | _HeadShared | None,
        position: int,
        sample_it: bool,
        first: bool,
    ) -> None:
        if isinstance(out, bytes):
            if self.corrupt_activations and self._fault_rng.random() < self.corrupt_activations:
                out = _damage(out, self._fault_rng)
                self.counters.activations_corrupted += 1
            payload = encode_message(
                Activation(meta.request_id, position, sample_it, out, meta if first else None)
            )
            self.counters.bytes_out += len(payload)
            await self.router.send_to(meta.route[self.index + 1], ACTIVATION_STREAM, payload)
            if sample_it and self.index == 0:
                self._sent_at[meta.request_id] = time.perf_counter()
        elif isinstance(out, int):
            await self._sampled(meta.request_id, out)
        elif isinstance(out, _HeadShared):
            share = HeadShare(meta.request_id, position, out.rows, out.hidden)
            await self.router.send_to(meta.route[0], HEAD_STREAM, encode_message(share))

    async def _head_share(self, share: HeadShare, peer: str) -> None:
        """First stage: compute the asked part of the head and send it back."""
        state = self._requests.get(share.request_id)
        if state is None:
            self.counters.stale_messages += 1
            log.info("%s: head share for unknown request %r dropped", self.name, share.request_id)
            return
        if peer != state.meta.route[-1] or self.index != 0:
            raise ValueError(
                f"a head share from {peer}, which is not the last stage of {share.request_id!r}"
                f", or to stage {self.index}, which is not the first"
            )
        start = time.perf_counter()
        part = await self._run(self._head_rows_last, share.tensor, share.row_start)
        self.counters.head_parts += 1
        self.counters.head_seconds += time.perf_counter() - start
        reply = HeadPart(share.request_id, share.position, share.row_start, part)
        await self.router.send_to(peer, HEAD_STREAM, encode_message(reply))

    async def _head_part(self, part: HeadPart) -> None:
        """Last stage: the first stage's part of the logits arrived; sample the token."""
        state = self._requests.get(part.request_id)
        pending = state.head if state is not None else None
        if pending is None or pending.position != part.position or pending.rows != part.row_start:
            self.counters.stale_messages += 1
            log.info("%s: head part for %r dropped (not awaited)", self.name, part.request_id)
            return
        assert state is not None
        state.head = None
        token, own_wait = await self._run(
            self._sample_joined,
            part.request_id,
            pending.own,
            part.tensor,
            pending.position + pending.length,
        )
        if pending.timed and self._head_tuner is not None:
            elapsed = time.perf_counter() - pending.started
            self._head_tuner.observe_split(pending.rows, elapsed, own_wait)
        await self._sampled(part.request_id, token)

    async def _sampled(self, request_id: str, token: int) -> None:
        """The last stage sampled `token`: back to the first stage, then to the requester."""
        state = self._requests[request_id]
        meta = state.meta
        position = self.stage.offset(request_id)  # the sampled token's position
        state.generated += 1
        self.counters.tokens_sampled += 1
        finish = (
            "stop"
            if token in self._eos
            else "length"
            if state.generated == meta.max_tokens
            else None
        )
        # A requester that left (without a Release) gets nothing more: stop its request.
        gone = meta.reply_to not in self.router.connected
        done = finish is not None or gone
        feedback = TokenFeedback(request_id, position, token, done)
        if self.num_stages > 1:
            await self.router.send_to(meta.route[0], TOKEN_STREAM, encode_message(feedback))
        elif not done:
            self._local.append(_Work(TOKEN_STREAM, self.router.node_id, feedback))
        if gone:
            self.counters.abandoned += 1
            log.info("%s: requester %s of %r is gone", self.name, meta.reply_to, request_id)
        else:
            assert state.writer is not None
            await self._chunks_send.send((state.writer.chunk(token, finish), meta))
        if done:
            self._finish(request_id)
            for peer in meta.route[1:-1]:
                await self._send_release(peer, request_id, "finished")

    async def _token(self, feedback: TokenFeedback) -> None:
        rid = feedback.request_id
        sent = self._sent_at.pop(rid, None)
        if sent is not None:
            self.counters.round_trips += 1
            self.counters.round_trip_seconds += time.perf_counter() - sent
        state = self._requests.get(rid)
        if state is None:
            self.counters.stale_messages += 1
            log.info("%s: token for unknown request %r dropped", self.name, rid)
            return
        if feedback.done:
            self._finish(rid)
            return
        out = await self._run(self._compute, rid, [feedback.token_id], feedback.position, True)
        await self._emit(state.meta, out, feedback.position, True, first=False)

    def _finish(self, request_id: str) -> None:
        self._sent_at.pop(request_id, None)
        if self._requests.pop(request_id, None) is not None:
            self.counters.finished += 1
        self.stage.release(request_id)

    def _release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._sent_at.pop(request_id, None)
        self.stage.release(request_id)

    async def _send_release(self, peer: str, request_id: str, reason: str) -> None:
        if peer != self.router.node_id:
            payload = encode_message(Release(request_id, reason))
            await self.router.send_to(peer, CONTROL_STREAM, payload)

    async def _fail(
        self,
        request_id: str,
        detail: str,
        meta: RequestMeta | None,
        kind: str = "error",
        suspect: str = "",
    ) -> None:
        """Tell the requester which stage failed and why; release the request everywhere."""
        self._sent_at.pop(request_id, None)
        state = self._requests.pop(request_id, None)
        self.stage.release(request_id)
        self.counters.failed += 1
        meta = state.meta if state is not None else meta
        if meta is None:
            return
        failure = Failure(request_id, self.index, self.router.node_id, detail, kind, suspect)
        with anyio.move_on_after(10):
            await self.router.send_to(meta.reply_to, CLIENT_STREAM, encode_message(failure))
            for peer in meta.route:
                await self._send_release(peer, request_id, "failed")

    async def _reconfigure(self, message: Reconfigure, peer: str) -> None:
        """Serve other layers under a new plan; answer with this node's `InfoReply`."""
        layers = range(message.layer_start, message.layer_stop)
        start = time.perf_counter()
        error = ""
        try:
            if self.model_dir is None or self.footprint is None:
                raise RuntimeError("this node was started without a model directory to reload")
            if not 0 <= message.stage < message.num_stages:
                raise ValueError(f"stage {message.stage} of {message.num_stages} does not exist")
            if message.epoch <= self.epoch:
                # A late or replayed plan must not take a node back to an older layout.
                raise ValueError(f"plan epoch {message.epoch} is not newer than {self.epoch}")
            need = self.footprint.stage_bytes(layers)
            if need > self.memory_budget:
                raise MemoryError(
                    f"layers {layers.start}-{layers.stop - 1} need {format_bytes(need)}, more "
                    f"than this node's memory budget of {format_bytes(self.memory_budget)}"
                )
            for rid in list(self._requests):
                self._release(rid)
            self._local.clear()
            stage = self.stage
            if layers != stage.layers:
                # Loaded before the old stage is let go: a node that cannot load keeps serving
                # its old layers (and says why), at the price of both in memory for a moment.
                stage = await self._run(restage, stage, self.model_dir, layers)
            _check_stage(stage, message.stage, message.num_stages)
            for rid in self.stage.request_ids:
                self.stage.release(rid)
            self.stage = stage
            self.index, self.num_stages, self.epoch = (
                message.stage,
                message.num_stages,
                message.epoch,
            )
            self.counters.reconfigurations += 1
            if self.stage.is_last and TOKENS.topic not in self.router.topic_routers:
                await self.router.register_topic(TOKENS)
            log.warning(
                "%s: reconfigured for epoch %d: layers %d-%d in %.2f s",
                self.name,
                self.epoch,
                layers.start,
                layers.stop - 1,
                time.perf_counter() - start,
            )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: cannot reconfigure: %s", self.name, error)
        reply = attrs.evolve(
            self.info(message.nonce),
            error=error,
            load_seconds=round(time.perf_counter() - start, 3),
        )
        await self._reply(peer, reply)

    # -- the token stream ------------------------------------------------------------------

    async def _publisher(self) -> None:
        """Hand chunks to the requesters, off the critical path of the next token."""
        sender = None
        async with self._chunks_recv:
            async for chunk, meta in self._chunks_recv:
                if meta.chunks == "direct":
                    await self.router.send_to(meta.reply_to, CHUNK_STREAM, chunk.to_bytes())
                else:
                    if sender is None:
                        if TOKENS.topic not in self.router.topic_routers:
                            await self.router.register_topic(TOKENS)
                        sender = self.router.sender(TOKENS)
                    await self._await_subscriber(meta.reply_to, chunk.request_id)
                    await sender.send(chunk)
                self.counters.chunks_published += 1

    async def _await_subscriber(self, peer: str, request_id: str) -> None:
        """A chunk published before the requester's subscription is known here would not be
        sent to it: wait for the subscription (bounded)."""
        if peer in self.router.subscribers(TOKENS.topic):
            return
        with anyio.move_on_after(SUBSCRIBER_WAIT):
            while peer not in self.router.subscribers(TOKENS.topic):
                await anyio.sleep(0.01)
            return
        log.warning(
            "%s: requester %s of %r is not subscribed to %s; publishing anyway",
            self.name,
            peer,
            request_id,
            TOKENS.topic,
        )


def _check_stage(stage: PipelineStage, index: int, num_stages: int) -> None:
    if not 0 <= index < num_stages:
        raise ValueError(f"stage {index} of {num_stages} does not exist")
    if stage.is_first != (index == 0) or stage.is_last != (index == num_stages - 1):
        raise ValueError(
            f"stage {index} of {num_stages} cannot serve layers "
            f"{stage.layers.start}-{stage.layers.stop - 1} of {stage.num_model_layers}"
        )


def _damage(data: bytes, rng: random.Random) -> bytes:
    """`data` with one byte of its second half flipped: the tensor's elements, not the codec
    header, so the receiver's checksum (not its parser) is what catches it."""
    damaged = bytearray(data)
    damaged[rng.randrange(len(data) // 2, len(data))] ^= 0xFF
    return bytes(damaged)


# -- the process ---------------------------------------------------------------------------


def _print(event: dict[str, Any]) -> None:
    try:
        print(json.dumps(event), flush=True)
    except (OSError, ValueError):
        pass  # a detached node's launcher is gone: nobody reads these lines any more


async def _until(wait: Callable[[], Awaitable[None]], tg: anyio.abc.TaskGroup) -> None:
    await wait()
    tg.cancel_scope.cancel()


async def _stdin_closed() -> None:
    await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def _signalled() -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def run_node(args: argparse.Namespace) -> int:
    """The node process: router, stage, serve; returns the exit status."""
    layers = parse_layers(args.layers)
    bootstrap = list(args.bootstrap)
    if args.bootstrap_stdin:
        # The launcher starts every process at once (imports take seconds) and hands each
        # its bootstrap addresses when the earlier nodes are listening.
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            raise RuntimeError("standard input closed before the bootstrap addresses came")
        bootstrap += json.loads(line)["bootstrap"]
    faults_text = args.faults if args.faults is not None else os.environ.get(FAULTS_ENV, "")
    faults = FaultConfig.parse(faults_text) if faults_text else None
    config = RouterConfig(engine=EngineConfig(faults=faults))
    router = Router.create(bootstrap_peers=bootstrap, listen_port=args.port, config=config)
    worker = MlxWorker(args.compute)
    try:
        await _serve_node(args, router, worker, layers)
    finally:
        worker.close()
    return 0


async def _serve_node(
    args: argparse.Namespace, router: Router, worker: MlxWorker, layers: range
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        with anyio.fail_after(60):
            await router.wait_ready()
        # Publish this stage's health view on p2pr/health, so that `p2pr health` lists it.
        from discovery.share import share_health

        tg.start_soon(share_health, router, "stage", f"stage {args.stage}")
        common = {"node_id": router.node_id, "stage": args.stage, "pid": os.getpid()}
        _print({"event": "listening", **common, "addrs": router.listen_addrs})
        start = time.perf_counter()
        budget = parse_bytes(args.memory_budget) if args.memory_budget else available_memory()
        need = ModelFootprint.from_dir(args.model).stage_bytes(layers)
        if need > budget:
            raise MemoryError(
                f"layers {layers.start}-{layers.stop - 1} need {format_bytes(need)} of weights, "
                f"more than this node's memory budget of {format_bytes(budget)}"
            )
        stage, tokenizer = await worker.run(load_stage, args.model, layers)
        fingerprint = await anyio.to_thread.run_sync(model_fingerprint, args.model)
        node = StageNode(
            router,
            stage,
            tokenizer,
            stage_index=args.stage,
            num_stages=args.stages,
            model=args.model_name or Path(args.model).name,
            fingerprint=fingerprint,
            worker=worker,
            vocab_size=int(
                json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
            ),
            model_dir=args.model,
            memory_budget=budget,
            corrupt_activations=args.corrupt_activations,
            fault_seed=args.fault_seed,
            allow_fault_control=args.allow_fault_control,
            adaptive_head_split=(args.head_split or os.environ.get(HEAD_SPLIT_ENV, "adaptive"))
            != "fixed",
        )
        tg.start_soon(node.serve)
        _print(
            {
                "event": "ready",
                **common,
                "layers": [layers.start, layers.stop],
                "load_seconds": round(time.perf_counter() - start, 3),
                "fingerprint": fingerprint,
            }
        )
        tg.start_soon(_until, _signalled, tg)
        if not args.detach:
            tg.start_soon(_until, _stdin_closed, tg)


def build_parser() -> argparse.ArgumentParser:
    """The node's command line."""
    parser = argparse.ArgumentParser(prog="python -m inference_glue.node", description=__doc__)
    parser.add_argument("--model", required=True, help="mlx-lm model directory")
    parser.add_argument("--model-name", default=None, help="name shown to clients")
    parser.add_argument("--layers", required=True, help="START:STOP, e.g. 0:15")
    parser.add_argument("--stage", type=int, required=True, help="this stage's index")
    parser.add_argument("--stages", type=int, required=True, help="number of stages")
    parser.add_argument("--bootstrap", action="append", default=[], help="peer multiaddr")
    parser.add_argument(
        "--bootstrap-stdin",
        action="store_true",
        help="read a JSON line {'bootstrap': [...]} from stdin before starting",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any)")
    parser.add_argument("--faults", default=None, help=f"fault shim settings (or ${FAULTS_ENV})")
    parser.add_argument("--compute", choices=COMPUTE_MODES, default="inline")
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="bytes of weights this node may hold, e.g. 512M (default: available memory)",
    )
    parser.add_argument(
        "--corrupt-activations",
        type=float,
        default=0.0,
        help="fault injection: fraction of outgoing hidden states to damage",
    )
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of that injection")
    parser.add_argument(
        "--allow-fault-control",
        action="store_true",
        help="obey SetFaults messages (chaos runs only: any peer could then inject faults)",
    )
    parser.add_argument(
        "--head-split",
        choices=["adaptive", "fixed"],
        default=None,
        help="as the last stage of a split LM head: move the cut with measured times "
        f"(adaptive, the default), or keep the client's cut (fixed, for tests; or "
        f"${HEAD_SPLIT_ENV})",
    )
    parser.add_argument(
        "--detach", action="store_true", help="run until SIGTERM, not until stdin closes"
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m inference_glue.node`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s stage {args.stage} %(name)s %(levelname)s %(message)s",
    )
    try:
        code = anyio.run(run_node, args, backend="trio")
    except KeyboardInterrupt:
        code = 0
    except BaseException as exc:  # reported to the launcher, which names this node
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
        message = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        log.exception("node failed")
        _print({"event": "error", "stage": args.stage, "message": message})
        code = 1
    if args.compute == "thread":
        # MLX 0.32 aborts at interpreter exit ("terminate called without an active
        # exception") once a second thread has used it; the work is done, so leave at once.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
