"""The client of a pipeline: submit requests, reassemble the token streams, read counters.

    async with PipelineClient.connect(addrs, model_dir) as client:
        async for chunk in client.stream(prompt_ids, max_tokens=64, temp=0.7, seed=1):
            print(chunk.text, end="", flush=True)
        result = await client.generate(prompt_ids, 32)        # the whole GenerationResult
        report = await client.stats()                         # counters of every node, per link

The client is a router node of its own: it bootstraps from every stage node's address, asks
each what it serves (`InfoQuery`, `inference_glue.rpc`), checks that they form one pipeline
(same model files, contiguous layers covering the model: `inference_glue.plan`), and sends
requests to the first stage. The chunks of each request go through a `TokenStreamAssembler`
(order, duplicates, checksums, joined text against the tokenizer); a stream that cannot be
completed (a stage failed or left, the protocol gave up on a chunk, or nothing came for
`idle_timeout`) raises `TokenStreamError`, which names the missing seq ranges and the stage
and peer the chunks come from: never a silently short text.

Failover (on by default) is the `FailoverDriver`'s (`inference_glue.failover_driver`): when a
stage node dies, or keeps sending corrupt hidden states, it re-plans the layers over the
nodes left, has them load the layers, and the request resumes where the stream stopped; the
caller sees one unbroken stream. Between requests it keeps the pipeline whole: a node that
returns or restarts is planned in again, in its old place. `client.events` and
`client.recoveries` record what happened and how long it took.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from discovery.health import ClusterViews, HealthView
from inference_glue.client_inbox import ClientInbox
from inference_glue.client_stats import LINK_COUNTERS, cluster_stats, stage_records
from inference_glue.failover import CorruptionTracker, FailoverPolicy, PeerEvent, Recovery
from inference_glue.failover_driver import FailoverDriver
from inference_glue.fault_control import set_pipeline_faults
from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint
from inference_glue.local_pipeline import DEFAULT_PREFILL_STEP_SIZE
from inference_glue.messages import (
    CHUNK_DELIVERY,
    CHUNK_STREAM,
    CLIENT_STREAM,
    TOKENS,
    InfoQuery,
    InfoReply,
    StatsQuery,
    StatsReply,
)
from inference_glue.plan import PipelineError, StageFailedError, StageInfo, peer_id_of
from inference_glue.planner import Planner
from inference_glue.request_stream import GenerationResult, RequestOptions, RequestStream
from inference_glue.rpc import RequestReply
from inference_glue.sampling import SamplingParams
from inference_glue.stage_exchange import StageExchange
from inference_glue.stream_checks import TokenStreamError
from inference_glue.tokens import AssemblerStats, TokenChunk, load_tokenizer
from router import (
    CONNECTION_MESSAGES,
    EngineConfig,
    FaultConfig,
    Router,
    RouterConfig,
    RouterLike,
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
# How long a client that joined part of a pipeline looks for its other stages (in seconds).
REST_OF_PLAN_WAIT = 15.0


class PipelineClient:
    """Requests to a running pipeline over a running router (see `connect`)."""

    def __init__(
        self,
        router: RouterLike,
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
        self.footprint = footprint
        # The first stage computes part of the LM head while the last computes the rest,
        # when the model allows it (see RequestMeta.head_split).
        self.split_head = split_head
        self.policy = policy or FailoverPolicy()
        self._changed = anyio.Event()  # set (and replaced) on connections, replies, new plans
        self.rpc = RequestReply(router, self.wait_until, self._notify)
        self.inbox = ClientInbox(router, self.rpc, self._on_connection)
        # Finds stage nodes (a restarted one, through any survivor) in their health views,
        # followed from the first node lost on.
        self.exchange = StageExchange(router, lambda: self.planner.excluded, self._heard_view)
        self.planner = Planner(
            router,
            self.rpc,
            footprint,
            self.policy,
            notify=self._notify,
            follow_views=self.exchange.follow,
        )
        self.failover = FailoverDriver(router, self.planner, self.policy, self.planner.release)
        if stages:
            self.planner.set_stages(stages)
        # What each finished or failed stream's assembler rejected (duplicates, corrupt…).
        self.stream_stats: dict[str, AssemblerStats] = {}
        self._join_addrs: list[str] = []

    # -- what the planner and the failover driver hold -------------------------------------

    @property
    def stages(self) -> list[StageInfo]:
        """The pipeline's stages, in order."""
        return self.planner.stages

    @property
    def epoch(self) -> int:
        """The plan's epoch."""
        return self.planner.epoch

    @property
    def events(self) -> list[PeerEvent]:
        """What the client noticed about nodes (lost, corrupt, quarantined, reconfigured…)."""
        return self.planner.events

    @property
    def recoveries(self) -> list[Recovery]:
        """Every failover, with its timings."""
        return self.failover.recoveries

    @property
    def corruption(self) -> CorruptionTracker:
        """Consecutive corrupt hidden states per peer, and the quarantined ones."""
        return self.planner.corruption

    @property
    def budgets(self) -> dict[str, int]:
        """Stage nodes of this model that answered, and the bytes each may hold."""
        return self.planner.roster.budgets

    @property
    def views(self) -> ClusterViews:
        """The stage nodes' health views (since the client follows them: see `exchange`)."""
        return self.exchange.views

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
        cluster_secret: bytes | None = None,
    ) -> AsyncIterator[PipelineClient]:
        """Join the pipeline whose nodes listen at `addrs` (one multiaddr per node is
        enough; of a `p2pr serve` cluster, one node's: the others are found through it)
        over a new `Router`; `model_dir` gives the tokenizer and the layers' sizes.
        `faults`: this client's fault shim; `cluster_secret`: the nodes'. The other
        options are `over`'s."""
        config = RouterConfig(
            engine=EngineConfig(
                faults=FaultConfig.parse(faults) if faults else None, cluster_secret=cluster_secret
            )
        )
        router = Router.create(bootstrap_peers=list(addrs), config=config)
        peers = list(dict.fromkeys(peer_id_of(a) for a in addrs))
        async with cls.over(
            router,
            peers,
            model_dir,
            timeout=timeout,
            chunks=chunks,
            policy=policy,
            split_head=split_head,
        ) as client:
            client._join_addrs = list(addrs)
            yield client

    @classmethod
    @asynccontextmanager
    async def over(
        cls,
        router: RouterLike,
        peers: Sequence[str],
        model_dir: str | Path,
        *,
        timeout: float = 60.0,
        chunks: str = DEFAULT_CHUNKS,
        policy: FailoverPolicy | None = None,
        split_head: bool = True,
        keep_plan: bool = True,
    ) -> AsyncIterator[PipelineClient]:
        """Join the pipeline of the stage nodes `peers` over `router` (not running yet: the
        client runs it until the block ends). `chunks`: how token chunks come by default,
        "direct" or "topic". `policy`: failover settings. `split_head`: the first and last
        stages each compute part of the LM head (when the model's embeddings are tied).
        `keep_plan`: between requests, bring nodes that return or join into the plan by
        itself (False: only `rebalance()` does)."""
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
        async with client._running(router) as tg:
            await client._join(list(peers), timeout)
            if keep_plan:
                tg.start_soon(client.planner.keep_plan)
            yield client

    @asynccontextmanager
    async def _running(self, router: RouterLike) -> AsyncIterator[anyio.abc.TaskGroup]:
        """The router and the client's tasks, until the caller is done; then leave politely:
        what we sent is acknowledged and our own acks are out, so the nodes do not
        retransmit to (and give up on) a peer that left."""
        await router.register_topic(TOKENS)
        await router.register_topic(CONNECTION_MESSAGES)
        topic_chunks = router.receiver(TOKENS)
        connections = router.receiver(CONNECTION_MESSAGES)
        replies = router.direct_receiver(CLIENT_STREAM)
        direct_chunks = router.direct_receiver(CHUNK_STREAM)
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(router.run)
            tg.start_soon(self.inbox.run, topic_chunks, direct_chunks, replies, connections)
            tg.start_soon(self.exchange.run)
            try:
                yield tg
                with anyio.move_on_after(2):
                    await router.drain()
                    await anyio.sleep(0.05)  # our last acks on their way out
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
        infos: list[InfoReply] = await self.rpc.query(peers, InfoQuery, timeout)
        infos += await self._rest_of_plan(infos, min(timeout, REST_OF_PLAN_WAIT))
        await self.planner.adopt(infos)
        await self.planner.await_last_stage(timeout)

    async def _rest_of_plan(self, infos: list[InfoReply], timeout: float) -> list[InfoReply]:
        """The other stage nodes of the newest plan, when the nodes given are only part of it
        (one address of a `p2pr serve` cluster): found through the nodes' health views
        within `timeout` seconds (a stage that is gone is not; the plan is then redone)."""
        epoch = max(i.epoch for i in infos)
        stages = max((i.num_stages for i in infos if i.epoch == epoch), default=0)
        model = infos[0].model_fingerprint
        found: list[InfoReply] = []

        def short() -> int:
            return stages - sum(1 for i in infos + found if i.epoch == epoch and i.num_stages)

        if short() <= 0:
            return found
        self.exchange.follow()
        asked = {i.node_id for i in infos} | {self.router.node_id}
        with anyio.move_on_after(timeout):
            while short() > 0:
                await self.wait_until(lambda: bool(self.router.connected - asked), timeout)
                new = sorted(self.router.connected - asked)
                asked.update(new)
                replies = await self.rpc.ask({p: InfoQuery for p in new}, self.policy.query_timeout)
                found += [
                    r
                    for r in replies.values()
                    if isinstance(r, InfoReply) and r.model_fingerprint == model
                ]
        return found

    # -- what the client hears -------------------------------------------------------------

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

    def _on_connection(self, peer: str, connected: bool) -> None:
        self.planner.on_connection(peer, connected)
        self._notify()

    def _heard_view(self, view: HealthView) -> None:
        self.planner.heard_view(view)
        self._notify()

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
        if rid in self.inbox.streams:
            raise ValueError(f"request id {rid!r} is already in flight")
        options = RequestOptions(
            max_tokens, temp, top_p, seed, prefill_step_size, chunks or self.chunks, idle_timeout
        )
        request = RequestStream(
            self.planner, self.failover, self.inbox, self.tokenizer, self._head_split
        )
        try:
            async with aclosing(request.chunks(rid, prompt_ids, options)) as chunks_:
                async for chunk in chunks_:
                    yield chunk
        finally:
            if request.stats is not None:
                self.stream_stats[rid] = request.stats

    def _head_split(self) -> int:
        if not self.split_head or self.footprint is None or len(self.stages) < 2:
            return 0
        return self.footprint.head_split

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

    async def rebalance(self) -> bool:
        """Bring nodes that joined or returned since the last plan into the pipeline now
        (the client does so by itself between requests). True if the plan changed."""
        return await self.planner.rebalance()

    async def set_faults(
        self,
        faults: str = "",
        partitions: dict[str, Sequence[str]] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Fault injection for chaos runs (`fault_control.set_pipeline_faults`): every stage
        node and this client get the shim settings `faults`; `partitions` maps a node to the
        peers it is cut from. Raises `PipelineError` if a node refuses or does not answer."""
        await set_pipeline_faults(self.rpc, self.stages, faults, partitions or {}, timeout)

    # -- counters --------------------------------------------------------------------------

    def stage_records(self) -> list[dict[str, Any]]:
        """The stages as a kept pipeline's record lists them (`client_stats.stage_records`)."""
        return stage_records(self.stages, self.views, self._join_addrs)

    def names(self) -> dict[str, str]:
        """Peer id -> 'stage i' / 'client'."""
        names = {s.node_id: f"stage {s.index}" for s in self.stages}
        names[self.router.node_id] = "client"
        return names

    async def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """Every node's counters (and this client's), and one row per link node -> peer
        (`client_stats.cluster_stats`)."""
        # A stage whose connection is gone cannot answer (its counters died with it).
        live = [s.node_id for s in self.stages if s.node_id in self.router.connected]
        replies: list[StatsReply] = await self.rpc.query(live, StatsQuery, timeout)
        own = await self.router.counters(timeout=10.0)
        own["work"] = {"bad_messages": self.inbox.bad_messages}
        return cluster_stats(replies, own, self.router.node_id, self.names())
