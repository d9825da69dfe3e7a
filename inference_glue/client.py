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

Failover (`inference_glue.failover`, on by default): when a stage node dies, or keeps sending
corrupt hidden states, the client re-plans the layers over the nodes left, has them load the
layers, and resumes the request where the stream stopped; the caller sees one unbroken stream.
`client.events` and `client.recoveries` record what happened and how long it took.

Between requests the client keeps the pipeline whole by itself: a node that returns (it was
paused, its link broke) or a restarted one (found through the stage nodes' health views,
`inference_glue.stage_exchange`) is asked what it serves and planned in again, in its old place
(`inference_glue.roster`); a node gone between requests is planned out. Plans change only
while no request is in flight.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from discovery.health import ClusterViews, HealthView
from inference_glue.failover import (
    CorruptionTracker,
    FailoverPolicy,
    NodeOffer,
    PeerEvent,
    Recovery,
    attempt_id,
    plan_stages,
)
from inference_glue.failover import now as clock
from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint
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
    Message,
    MessageDecodeError,
    Reconfigure,
    Release,
    RequestMeta,
    SetFaults,
    StatsQuery,
    StatsReply,
    decode_message,
    encode_message,
)
from inference_glue.node import router_counters
from inference_glue.roster import Roster
from inference_glue.sampling import SamplingParams
from inference_glue.stage_exchange import StageExchange
from inference_glue.tokens import (
    AssemblerStats,
    IncompleteStreamError,
    TextMismatchError,
    TokenChunk,
    TokenChunkDecodeError,
    TokenStreamAssembler,
    TokenStreamWriter,
)
from p2p_reliable import Gap, Unrecoverable
from router import (
    CONNECTION_MESSAGES,
    ConnectionMessage,
    DirectMessage,
    EngineConfig,
    FaultConfig,
    Receiver,
    Router,
    RouterConfig,
)

__all__ = [
    "LINK_COUNTERS",
    "GenerationResult",
    "ModelDoesNotFitError",
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


log = logging.getLogger("p2pr.inference.client")


@attrs.frozen
class _Wake:
    """Put in a stream's channel when a connection opens or closes: look at the stages."""


_WAKE = _Wake()


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

    @classmethod
    def from_reply(cls, reply: InfoReply) -> StageInfo:
        """The stage a node describes in its `InfoReply`."""
        return cls(
            index=reply.stage,
            node_id=reply.node_id,
            layers=range(reply.layer_start, reply.layer_stop),
            num_layers=reply.num_layers,
            model=reply.model,
            fingerprint=reply.model_fingerprint,
            blas=reply.blas,
            blas_threads=reply.blas_threads,
            pid=reply.pid,
        )


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
        footprint: ModelFootprint | None = None,
        policy: FailoverPolicy | None = None,
        split_head: bool = True,
    ) -> None:
        if chunks not in CHUNK_DELIVERY:
            raise ValueError(f"chunks must be one of {CHUNK_DELIVERY}, got {chunks!r}")
        self.router = router
        self.chunks = chunks
        self.tokenizer = tokenizer
        self.stages = list(stages)
        self._streams: dict[str, MemoryObjectSendStream[TokenChunk | Failure | _Wake]] = {}
        self._replies: dict[int, InfoReply | StatsReply | None] = {}
        self._asked: dict[int, str] = {}  # nonce -> the peer whose answer it waits for
        self._nonces = itertools.count(1)
        self.bad_messages = 0
        self.footprint = footprint
        # The first stage computes part of the LM head while the last computes the rest,
        # when the model allows it (see RequestMeta.head_split).
        self.split_head = split_head
        self.policy = policy or FailoverPolicy()
        self.epoch = 0
        self.corruption = CorruptionTracker(self.policy.max_corrupt)
        self.roster = Roster(router.node_id)
        self.roster.quarantined = self.corruption.quarantined
        # Finds stage nodes (a restarted one, through any survivor) in their health views,
        # followed from the first node lost on.
        self.exchange = StageExchange(router, lambda: self.excluded, self._heard_view)
        self.events: list[PeerEvent] = []
        self.recoveries: list[Recovery] = []
        # What each finished or failed stream's assembler rejected (duplicates, corrupt…).
        self.stream_stats: dict[str, AssemblerStats] = {}
        self._health_read = 0.0
        self._plan_lock = anyio.Lock()
        self._ask_lock = anyio.Lock()
        self._active = 0  # requests in flight: the plan changes only when there are none
        self._changed = anyio.Event()  # set (and replaced) on connections, replies, new plans
        self._plan_due = anyio.Event()  # set: see whether the plan should change
        self._join_addrs: list[str] = []
        self._gone: set[str] = set()  # nodes whose loss was reported, until they connect again
        self._plan_broken = False  # a re-plan failed half-way: re-plan before the next use

    @property
    def budgets(self) -> dict[str, int]:
        """Stage nodes of this model that answered, and the bytes each may hold."""
        return self.roster.budgets

    @property
    def excluded(self) -> set[str]:
        """Nodes not to be planned now: quarantined, refusing, or lost and not back."""
        return self.roster.excluded

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
        policy: FailoverPolicy | None = None,
        split_head: bool = True,
    ) -> AsyncIterator[PipelineClient]:
        """Join the pipeline whose nodes listen at `addrs` (one multiaddr per node is
        enough); `model_dir` gives the tokenizer and the layers' sizes. `faults`: this
        client's fault shim. `chunks`: how token chunks come by default, "direct" or
        "topic". `policy`: failover settings. `split_head`: the first and last stages each
        compute part of the LM head (when the model's embeddings are tied)."""
        peers = list(dict.fromkeys(peer_id_of(a) for a in addrs))
        config = RouterConfig(
            engine=EngineConfig(faults=FaultConfig.parse(faults) if faults else None)
        )
        router = Router.create(bootstrap_peers=list(addrs), config=config)
        await router.register_topic(TOKENS)
        await router.register_topic(CONNECTION_MESSAGES)
        topic_chunks = router.receiver(TOKENS)
        connections = router.receiver(CONNECTION_MESSAGES)
        replies = router.direct_receiver(CLIENT_STREAM)
        direct_chunks = router.direct_receiver(CHUNK_STREAM)
        tokenizer = await anyio.to_thread.run_sync(load_tokenizer, model_dir)
        footprint = await anyio.to_thread.run_sync(ModelFootprint.from_dir, model_dir)
        client = cls(
            router,
            tokenizer,
            chunks=chunks,
            footprint=footprint,
            policy=policy,
            split_head=split_head,
        )
        client._join_addrs = list(addrs)
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(router.run)
            tg.start_soon(client._dispatch_chunks, topic_chunks)
            tg.start_soon(client._dispatch_direct_chunks, direct_chunks)
            tg.start_soon(client._dispatch_replies, replies)
            tg.start_soon(client._watch_connections, connections)
            tg.start_soon(client.exchange.run)
            try:
                await client._join(peers, timeout)
                tg.start_soon(client._keep_plan)
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
            await self.wait_until(lambda: set(peers) <= router.connected, timeout)
        missing = [p for p in peers if p not in router.connected]
        if missing:
            raise PipelineError(f"could not connect within {timeout:.0f} s to node(s) {missing}")
        infos: list[InfoReply] = await self._query(peers, InfoQuery, timeout)
        for info in infos:
            self.roster.served(info.node_id, info.memory_budget)
        self.epoch = max(i.epoch for i in infos)
        # After a failover the nodes of the newest plan form the pipeline; others are spares.
        current = [i for i in infos if i.epoch == self.epoch]
        try:
            self._set_stages(check_pipeline(current))
        except PipelineError:
            if not self.policy.enabled or self.footprint is None or len(current) == len(infos):
                raise
            check_pipeline_models(infos)
            self._set_stages([StageInfo.from_reply(i) for i in infos])
            async with self._plan_lock:
                await self._replan("the nodes of the newest plan do not form a pipeline")
        await self._await_token_subscription(timeout)

    async def _await_token_subscription(self, timeout: float) -> None:
        router = self.router
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
        replies = await self._ask({peer: kind for peer in peers}, timeout)
        silent = [p for p in peers if replies[p] is None]
        if silent:
            raise PipelineError(f"node(s) {silent} did not answer within {timeout:.0f} s")
        return [replies[p] for p in peers]

    async def _ask(
        self,
        asks: dict[str, Callable[[int], Message]],
        timeout: float,
        optional: Sequence[str] = (),
        grace: float = 0.3,
    ) -> dict[str, Any]:
        """Send each peer the message `asks[peer](nonce)` and gather the replies carrying
        that nonce: {peer: reply or None}. Stops waiting for a peer whose connection is gone;
        peers in `optional` (that may not be stage nodes at all) get only `grace` seconds
        after the others have answered."""
        nonces: dict[str, int] = {}
        for peer, make in asks.items():
            nonce = next(self._nonces)
            self._replies[nonce] = None
            self._asked[nonce] = peer
            nonces[peer] = nonce
            await self.router.send_to(peer, CONTROL_STREAM, encode_message(make(nonce)))

        def waiting(peers: Iterable[str]) -> list[str]:
            return [
                p for p in peers if self._replies[nonces[p]] is None and p in self.router.connected
            ]

        required = [p for p in nonces if p not in optional]
        try:
            # Woken by each reply and each connection event: a peer that leaves is not
            # waited for.
            with anyio.move_on_after(timeout):
                await self.wait_until(lambda: not waiting(required), timeout)
                await self.wait_until(lambda: not waiting(optional), grace)
            return {p: self._replies[n] for p, n in nonces.items()}
        finally:
            for nonce in nonces.values():
                self._replies.pop(nonce, None)
                self._asked.pop(nonce, None)

    # -- keeping the pipeline whole --------------------------------------------------------

    def _notify(self) -> None:
        """Wake whatever waits in `wait_until`: a connection, a reply, a health view or a
        new plan."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait at most `timeout` seconds until `done()`, checked again whenever the client
        hears something (a connection opened or closed, a reply, a health view, a new plan);
        whether it holds."""
        with anyio.move_on_after(timeout):
            while not done():
                await self._changed.wait()
        return done()

    def _lose(self, peer: str, reason: str) -> None:
        """Give up on `peer` for now: while its connection stays open (no answer to a probe)
        until it answers; else until it connects again. Reported once per loss."""
        self.roster.lose(peer, peer in self.router.connected)
        self.exchange.follow()
        if peer not in self._gone and peer not in self.corruption.quarantined:
            self._gone.add(peer)
            self._event(peer, "lost", reason)

    def _set_stages(self, stages: Sequence[StageInfo]) -> None:
        self.stages = list(stages)
        self.roster.rank(s.node_id for s in self.stages)
        self._notify()

    async def wait_for_stages(self, count: int, timeout: float) -> list[StageInfo]:
        """Wait until the pipeline spans `count` connected nodes (the client brings nodes
        that return or join into it between requests); the stages. PipelineError after
        `timeout` seconds."""

        def whole() -> bool:
            nodes = {s.node_id for s in self.stages}
            return len(nodes) == count and nodes <= self.router.connected

        if not await self.wait_until(whole, timeout):
            raise PipelineError(
                f"the pipeline has {len(self.stages)} stages, not {count}, after {timeout:.0f} s"
            )
        return list(self.stages)

    async def _watch_connections(self, messages: Receiver[ConnectionMessage]) -> None:
        """Connection events (the router's, prompt): streams in flight look at their stages
        at once, and the plan is looked at again."""
        async for message in messages:
            peer = message.node_id
            if not message.connected:
                self.roster.disconnected(peer)
                if peer in {s.node_id for s in self.stages}:
                    self.exchange.follow()
            elif peer in self._gone:
                self._gone.discard(peer)
                if peer not in self.excluded:
                    self._event(peer, "returned", "connected again; planned between requests")
            for stream in list(self._streams.values()):
                stream.send_nowait(_WAKE)
            self._notify()
            self._plan_due.set()

    @property
    def views(self) -> ClusterViews:
        """The stage nodes' health views (since the client follows them: see `exchange`)."""
        return self.exchange.views

    def _heard_view(self, view: HealthView) -> None:
        if view.role == "stage" and self.roster.claims_stage(view.node_id):
            self._plan_due.set()  # a node that did not answer in time says it serves
        self._notify()

    async def _keep_plan(self) -> None:
        """Between requests, re-plan when the usable nodes change (see `_replan_if_better`)."""
        while True:
            await self._plan_due.wait()
            self._plan_due = anyio.Event()
            try:
                await self._classify()
                async with self._plan_lock:
                    await self._replan_if_better()
            except Exception as exc:  # the next event tries again; requests report their own
                log.warning("the pipeline could not be re-planned: %s", exc)

    async def _classify(self) -> None:
        """Ask the connected peers that were never asked (or are lost, or came back) what
        they serve."""
        if not self.policy.enabled or not self.stages:
            return
        async with self._ask_lock:
            peers = self.roster.to_ask(self.router.connected)
            if peers:
                replies = await self._ask({p: InfoQuery for p in peers}, self.policy.query_timeout)
                for peer in peers:
                    self._judge(peer, replies.get(peer), mark_silent=True)

    async def _replan_if_better(self) -> bool:
        """Re-plan (with the plan lock held) when the nodes a plan would use now differ from
        the plan's: a node returned, restarted, joined or left. Never while a request is in
        flight (its end looks again). True if the plan changed."""
        if not self.policy.enabled or self.footprint is None or not self.stages or self._active:
            return False
        connected = self.router.connected
        current = {s.node_id for s in self.stages}
        offers = [NodeOffer(p, self.budgets[p] or (1 << 40)) for p in self.roster.usable(connected)]
        try:
            target = {node for node, _ in plan_stages(self.footprint, offers)}
        except ModelDoesNotFitError:
            if current <= connected:
                return False  # what serves now still does
            target = set()
        if target == current and current <= connected and not self._plan_broken:
            return False
        for peer in sorted(current - connected):
            self._lose(peer, "its connection closed between requests")
        back = ", ".join(sorted(target - current)) or "none"
        await self._replan(f"nodes to use changed (new or back: {back})")
        return True

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
            except TokenChunkDecodeError as exc:
                self.bad_messages += 1
                self.router.refused(item.peer, "bad token chunk", str(exc))
                continue
            stream = self._streams.get(chunk.request_id)
            if stream is not None:
                stream.send_nowait(chunk)

    async def _dispatch_replies(self, replies: Receiver[DirectMessage]) -> None:
        async for item in replies:
            try:
                message = decode_message(item.payload)
            except MessageDecodeError as exc:
                self.bad_messages += 1
                self.router.refused(item.peer, "bad pipeline message", str(exc))
                continue
            if isinstance(message, InfoReply | StatsReply):
                # Only the asked peer answers for itself (nonces are easy to guess).
                if self._asked.get(message.nonce) == item.peer == message.node_id:
                    self._replies[message.nonce] = message
                    self._notify()
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

        With failover on (the default `FailoverPolicy`), a lost or corrupting stage does not
        end the stream: the request resumes on the nodes left and the chunks go on at the
        next seq (see the module docstring).

        Raises:
            StageFailedError: a stage could not serve the request.
            TokenStreamError: the stream cannot be completed (see the module docstring).
            TextMismatchError: the joined text differs from the tokenizer's decoding.
            ModelDoesNotFitError: after a failure, the nodes left cannot hold the model.
        """
        SamplingParams(temp=temp, top_p=top_p, seed=seed)  # validates
        if not self.stages:
            raise PipelineError("not connected to a pipeline")
        rid = request_id or uuid.uuid4().hex[:16]
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in flight")

        def meta_for(key: str, resume: Sequence[int]) -> RequestMeta:
            return RequestMeta(
                key,
                max_tokens,
                temp,
                top_p,
                seed,
                prefill_step_size,
                tuple(s.node_id for s in self.stages),
                self.router.node_id,
                chunks or self.chunks,
                epoch=self.epoch,
                resume=tuple(resume),
                head_split=self._head_split(),
            )

        # Between requests, nodes that returned or joined are brought into the plan (and
        # nodes gone are left out); never while another request is in flight.
        await self._classify()
        async with self._plan_lock:
            await self._replan_if_better()
            meta = meta_for(rid, ())
            self._active += 1
        # The text is checked below against mlx-lm's own streaming detokenizer (what
        # stream_generate yields), not against tokenizer.decode: the two differ for a NUL byte.
        assembler = TokenStreamAssembler(rid, source=self.stages[-1].label)
        send, recv = anyio.create_memory_object_stream[TokenChunk | Failure | _Wake](float("inf"))
        self._streams[rid] = send
        known_events = {id(e) for e in self.router.protocol_events}
        progress = time.monotonic()
        attempt = 0
        recovery: Recovery | None = None
        try:
            await self._submit(meta, prompt_ids)
            while not assembler.complete:
                item: TokenChunk | Failure | _Wake | None = None
                # A closed connection wakes this at once (_watch_connections); the health
                # of the stages and the protocol's verdicts are read at least this often.
                with anyio.move_on_after(self.policy.health_interval):
                    item = await recv.receive()
                if isinstance(item, TokenChunk):
                    progress = time.monotonic()
                    ready = assembler.add(item)
                    if ready:
                        self.corruption.progress(meta.route)
                        if recovery is not None and recovery.first_token_at is None:
                            recovery.first_token_at = clock()
                    for chunk in ready:
                        yield chunk
                    continue
                trouble: tuple[str, set[str]] | None
                if isinstance(item, Failure):
                    if item.request_id != meta.request_id:
                        continue  # of an attempt given up already
                    trouble = self._failure_trouble(item)
                    if item.kind == "stale" and meta.epoch == self.epoch:
                        self._plan_broken = True  # a node of the current plan is not on it
                else:
                    trouble = await self._lost_stages(meta.route, progress)
                    if trouble is None:
                        reason, retry = self._stream_trouble(
                            meta.route, known_events, progress, idle_timeout
                        )
                        if reason is not None:
                            trouble = (reason, set()) if retry else None
                            if not retry or not self.policy.enabled:
                                _raise_incomplete(assembler, reason)
                if trouble is None:
                    continue
                reason, lost = trouble
                if not self.policy.enabled or attempt >= self.policy.max_attempts:
                    if isinstance(item, Failure):
                        raise StageFailedError(item)
                    _raise_incomplete(assembler, reason)
                attempt += 1
                recovery = await self._failover(rid, meta, attempt, assembler, reason, lost)
                del self._streams[meta.request_id]
                meta = meta_for(attempt_id(rid, attempt), [c.token_id for c in assembler.chunks])
                self._streams[meta.request_id] = send
                known_events = {id(e) for e in self.router.protocol_events}
                progress = time.monotonic()
                await self._submit(meta, prompt_ids)
            check_stream_text(self.tokenizer, assembler)
        finally:
            self._active -= 1
            if not self._active:
                self._plan_due.set()  # what changed meanwhile may now be acted on
            self._streams.pop(meta.request_id, None)
            self.stream_stats[rid] = assembler.stats
            if not assembler.complete:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await self._release(meta, "abandoned by the client")

    async def _submit(self, meta: RequestMeta, prompt_ids: Sequence[int]) -> None:
        request = GenerateRequest(meta, tuple(prompt_ids))
        await self.router.send_to(meta.route[0], REQUEST_STREAM, encode_message(request))

    async def _release(self, meta: RequestMeta, reason: str) -> None:
        """Ask every stage of `meta`'s route that is still there to drop the request."""
        payload = encode_message(Release(meta.request_id, reason))
        for peer in meta.route:
            if peer in self.router.connected and peer not in self.excluded:
                await self.router.send_to(peer, CONTROL_STREAM, payload)

    def _failure_trouble(self, failure: Failure) -> tuple[str, set[str]]:
        """What a stage's `Failure` means for failover: (reason, peers to exclude).

        Raises `StageFailedError` for failures that another attempt would only repeat."""
        if failure.kind == "stale":
            return f"stage {failure.stage} is on another plan: {failure.message}", set()
        if failure.kind != "corrupt" or not failure.suspect:
            raise StageFailedError(failure)
        peer = failure.suspect
        stage = self._stage_of(peer)
        count = self.corruption.counts.get(peer, 0) + 1
        self._event(peer, "corrupt", f"#{count} in a row: {failure.message}")
        if self.corruption.corrupt(peer):
            self._event(
                peer,
                "quarantined",
                f"after {count} consecutive corrupt hidden states (limit "
                f"{self.corruption.limit}); its layers move to other nodes",
                stage,
            )
            return f"quarantined {peer} (stage {stage}) for corrupt hidden states", {peer}
        return f"corrupt hidden state from {peer} (stage {stage}); retrying", set()

    async def _lost_stages(
        self, route: Sequence[str], progress: float
    ) -> tuple[str, set[str]] | None:
        """Stages of `route` that are gone, or None when all are there.

        A closed connection (a killed process) is enough. Phi accrual alone is not: under
        heavy loss heartbeats go missing too. A stage whose health says dead while no token
        has come for `hang_after` seconds gets a probe (`InfoQuery`, carried reliably); only
        a stage that does not answer it within `probe_timeout` is lost (a hung process)."""
        policy = self.policy
        lost = {peer for peer in route if peer not in self.router.connected}
        why = "connection closed"
        if not lost:
            if clock() - self._health_read < policy.health_interval:
                return None
            if time.monotonic() - progress < policy.hang_after:
                return None
            self._health_read = clock()
            rows = await self.router.health()
            dead = {
                str(r["peer"]) for r in rows if r.get("peer") in route and r.get("state") == "DEAD"
            }
            if not dead:
                return None
            replies = await self._ask({p: InfoQuery for p in sorted(dead)}, policy.probe_timeout)
            lost = {p for p in dead if replies.get(p) is None}
            why = f"no heartbeat (phi accrual) and no answer to a probe in {policy.probe_timeout:.0f} s"
            if not lost:
                return None
        labels = ", ".join(f"stage {self._stage_of(p)} ({p})" for p in sorted(lost))
        return f"lost {labels}: {why}", lost

    def _stream_trouble(
        self, route: Sequence[str], known: set[int], progress: float, idle_timeout: float
    ) -> tuple[str | None, bool]:
        """Why the current stream cannot complete (None while it still may), and whether
        another attempt could help."""
        last = self.stages[-1].node_id
        for event in list(self.router.protocol_events):
            if id(event) in known:
                continue
            if isinstance(event, Gap) and event.origin == last and event.stream in CHUNK_STREAMS:
                return f"the protocol reported a gap in the token chunks from {last}: {event}", True
            if isinstance(event, Unrecoverable) and event.peer in route:
                return f"the protocol gave up on a message: {event}", True
        if time.monotonic() - progress > idle_timeout:
            return f"no token chunk for {idle_timeout:.0f} s", False
        return None, False

    async def _failover(
        self,
        rid: str,
        meta: RequestMeta,
        attempt: int,
        assembler: TokenStreamAssembler,
        reason: str,
        lost: set[str],
    ) -> Recovery:
        """Stop the failed attempt, re-plan over the nodes left, and get the assembler ready
        for the next attempt; returns the record of this recovery."""
        recovery = Recovery(meta.request_id, attempt, reason, tuple(sorted(lost)), clock())
        self.recoveries.append(recovery)
        for peer in lost:
            self._lose(peer, reason)
        log.warning("request %r: %s; failing over (attempt %d)", meta.request_id, reason, attempt)
        await self._release(meta, f"failover: {reason}")
        # One re-plan at a time: requests in flight together all notice a lost node, and the
        # first to get here re-plans for all of them; the others resume on its plan.
        async with self._plan_lock:
            if lost & {s.node_id for s in self.stages} or self._plan_broken:
                await self._replan(reason)
        recovery.replanned_at = clock()
        key = attempt_id(rid, attempt)
        recovery.resumed_from = assembler.rekey(key)
        assembler.source = self.stages[-1].label
        recovery.route = tuple(s.node_id for s in self.stages)
        recovery.layers = tuple((s.layers.start, s.layers.stop) for s in self.stages)
        return recovery

    async def _replan(self, reason: str) -> None:
        """Plan the layers over every reachable node not excluded, have them load their
        layers, and make that the pipeline (`self.stages`, `self.epoch`).

        Raises:
            ModelDoesNotFitError: the nodes left cannot hold the model (at once).
            PipelineError: no plan could be put in place.
        """
        if self.footprint is None:
            raise PipelineError(f"{reason}; cannot re-plan without the model's layer sizes")
        # Until a plan is in place, some nodes may hold a newer epoch than `self.stages`.
        self._plan_broken = True
        for _ in range(3):
            offers = await self._offers()
            plan = plan_stages(self.footprint, offers)
            epoch = self.epoch + 1
            asks: dict[str, Callable[[int], Message]] = {
                node: functools.partial(
                    _reconfigure, epoch=epoch, stage=i, stages=len(plan), layers=layers
                )
                for i, (node, layers) in enumerate(plan)
            }
            replies = await self._ask(asks, self.policy.reconfigure_timeout)
            self.epoch = epoch
            if all(reply is not None and not reply.error for reply in replies.values()):
                self._plan_broken = False
                self._set_stages([StageInfo.from_reply(replies[node]) for node, _ in plan])
                layout = ", ".join(
                    f"{s.node_id[-6:]}: {s.layers.start}-{s.layers.stop - 1}" for s in self.stages
                )
                for s in self.stages:
                    self._event(s.node_id, "reconfigured", f"epoch {epoch}: {layout}", s.index)
                if self.stages[-1].node_id not in self.router.subscribers(TOKENS.topic):
                    with anyio.move_on_after(5):
                        await self._await_token_subscription(5)
                return
            for node, reply in replies.items():
                if reply is None:
                    # Gone (back when it connects again) or hung (back when it answers).
                    self._lose(node, f"no answer to the plan of epoch {epoch}")
                elif reply.error:
                    self.roster.refused.add(node)
                    self._event(node, "refused", f"epoch {epoch}: {reply.error}")
        raise PipelineError(f"{reason}; no new plan could be put in place after 3 tries")

    async def _offers(self, grace: float = 0.3) -> list[NodeOffer]:
        """Every connected node that serves this model and may be planned, with its memory
        budget, in rank order (a node that returns takes its old place): the known stage
        nodes, and any connected peer never asked (a restarted or spare node), which gets
        only `grace` seconds once the others have answered, so that a peer that is no stage
        node (another client) does not slow a failover down."""
        connected = self.router.connected
        known = set(self.roster.usable(connected))
        known |= {s.node_id for s in self.stages if s.node_id in connected} - self.excluded
        new = [p for p in self.roster.to_ask(connected) if p not in known | self.roster.lost]
        peers = self.roster.ordered(known | set(new))
        replies = await self._ask(
            {p: InfoQuery for p in peers}, self.policy.query_timeout, optional=new, grace=grace
        )
        offers = []
        for peer in peers:
            budget = self._judge(peer, replies.get(peer), mark_silent=False)
            if budget is not None:
                offers.append(NodeOffer(peer, budget))
        if not offers:
            raise ModelDoesNotFitError("no node is left to hold the model")
        return offers

    def _judge(self, peer: str, reply: Any, mark_silent: bool) -> int | None:
        """Record what `peer`'s answer to an InfoQuery says; its memory budget if it is a
        stage node of this pipeline's model."""
        if not isinstance(reply, InfoReply):
            if mark_silent:
                self.roster.no_answer(peer)
            return None
        model = self.stages[0] if self.stages else None
        if model is not None and (reply.model_fingerprint, reply.blas, reply.blas_threads) != (
            model.fingerprint,
            model.blas,
            model.blas_threads,
        ):
            self.roster.stranger(peer)
            return None
        self.roster.served(peer, reply.memory_budget)
        # A new plan's epoch must be above every node's, spares' included.
        self.epoch = max(self.epoch, reply.epoch)
        return reply.memory_budget or (1 << 40)

    async def rebalance(self) -> bool:
        """Bring nodes that joined or returned since the last plan into the pipeline now
        (the client does so by itself between requests; see `_keep_plan`). True if the plan
        changed."""
        await self._classify()
        async with self._plan_lock:
            return await self._replan_if_better()

    async def set_faults(
        self,
        faults: str = "",
        partitions: dict[str, Sequence[str]] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Fault injection for chaos runs: give every stage node (started with
        `--allow-fault-control`) and this client the shim settings `faults` ("" for none);
        `partitions` maps a node to the peers it is cut from (both ways need both entries).

        Raises `PipelineError` if a node refuses or does not answer."""
        from router import FaultConfig

        partitions = partitions or {}
        config = FaultConfig.parse(faults)
        asks: dict[str, Callable[[int], Message]] = {
            s.node_id: functools.partial(
                _set_faults, faults=faults, cut=partitions.get(s.node_id, ())
            )
            for s in self.stages
        }
        replies = await self._ask(asks, timeout)
        refused = {
            p: ("no answer" if r is None else r.error)
            for p, r in replies.items()
            if r is None or r.error
        }
        if refused:
            raise PipelineError(f"fault settings refused: {refused}")
        engine = self.router.engine
        if engine is not None:
            engine.submit_faults(config)
            engine.submit_partition(set(partitions.get(self.router.node_id, ())))

    def _head_split(self) -> int:
        if not self.split_head or self.footprint is None or len(self.stages) < 2:
            return 0
        return self.footprint.head_split

    def _stage_of(self, peer: str) -> int | None:
        return next((s.index for s in self.stages if s.node_id == peer), None)

    def _event(self, peer: str, kind: str, detail: str, stage: int | None = None) -> None:
        event = PeerEvent(
            time.time(), peer, self._stage_of(peer) if stage is None else stage, kind, detail
        )
        self.events.append(event)
        log.warning("%s", event.line())

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

    def stage_records(self) -> list[dict[str, Any]]:
        """The stages as a kept cluster's record lists them (`cluster.record_plan`): node
        id, pid, layers, and where the node listens (its health view says; else the address
        this client joined it at)."""
        records = []
        for s in self.stages:
            view = self.views.views.get(s.node_id)
            addrs = list(view.addrs) if view is not None else []
            addrs += [a for a in self._join_addrs if a.endswith(f"/p2p/{s.node_id}")]
            layers = [s.layers.start, s.layers.stop]
            records.append({"node_id": s.node_id, "pid": s.pid, "layers": layers, "addrs": addrs})
        return records

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
        # A stage whose connection is gone cannot answer (its counters died with it).
        live = [s.node_id for s in self.stages if s.node_id in self.router.connected]
        replies: list[StatsReply] = await self._query(live, StatsQuery, timeout)
        own = await self.router.query(router_counters(self.router), timeout=10.0)
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


def _reconfigure(nonce: int, *, epoch: int, stage: int, stages: int, layers: range) -> Reconfigure:
    return Reconfigure(nonce, epoch, stage, stages, layers.start, layers.stop)


def _set_faults(nonce: int, *, faults: str, cut: Sequence[str]) -> SetFaults:
    return SetFaults(nonce, faults, tuple(cut))


def _raise_incomplete(assembler: TokenStreamAssembler, reason: str) -> NoReturn:
    try:
        assembler.finish()
    except IncompleteStreamError as exc:
        raise TokenStreamError(exc, reason) from None
    raise AssertionError("a complete stream has no trouble")


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


def check_pipeline_models(infos: Sequence[InfoReply]) -> None:
    """Check that the nodes serve the same model files with the same BLAS set-up."""
    stages = [StageInfo.from_reply(i) for i in infos]
    described = ", ".join(
        f"{s.label}: layers {s.layers.start}-{s.layers.stop - 1} of {s.num_layers} "
        f"of {s.model} [{s.fingerprint}]"
        for s in stages
    )
    if len({(s.fingerprint, s.num_layers) for s in stages}) != 1:
        raise PipelineError(f"the nodes do not serve the same model files: {described}")
    if len({(s.blas, s.blas_threads) for s in stages}) != 1:
        raise PipelineError(
            "the nodes use different BLAS set-ups, so results would not be bit-exact: "
            + ", ".join(f"{s.label}: {s.blas} x{s.blas_threads}" for s in stages)
        )


def check_pipeline(infos: Sequence[InfoReply]) -> list[StageInfo]:
    """The stages in order, after checking that the nodes form one pipeline."""
    if not infos:
        raise PipelineError("no stage nodes")
    check_pipeline_models(infos)
    stages = sorted((StageInfo.from_reply(i) for i in infos), key=lambda s: s.layers.start)
    described = ", ".join(
        f"{s.label}: layers {s.layers.start}-{s.layers.stop - 1} of {s.num_layers}" for s in stages
    )
    expected = 0
    for position, stage in enumerate(stages):
        if stage.layers.start != expected or stage.index != position:
            raise PipelineError(f"the nodes do not form one pipeline: {described}")
        expected = stage.layers.stop
    if expected != stages[0].num_layers or len(stages) != infos[0].num_stages:
        raise PipelineError(f"the nodes do not cover the whole model: {described}")
    return stages
