"""A pipeline stage node: serves one contiguous range of a model's layers over a `Router`.

`StageNode` runs in any process with a running router; `python -m p2pr.stage_node` is the
process that holds one (`p2pr.stage_cluster` starts several). This module is its request
lifecycle and routing; the MLX calls are `StageCompute`'s (`inference_glue.stage_compute`),
the control plane `StageControl`'s (`inference_glue.node_control`), the decoding and queueing
of its messages `NodeInbox`'s (`inference_glue.node_inbox`), the delivery of token chunks
`TokenPublisher`'s (`inference_glue.token_publisher`); a message of a request the protocol
gave up fails the request (`inference_glue.link_watch`), so that its client resumes it.

How a request flows through the stages: `inference_glue` (the package's docstring).

Failover (driven by the client, see `inference_glue.failover_driver`): a `Reconfigure` gives
the node new layers, stage index and plan epoch (`StageControl.reconfigure`). A request with
`RequestMeta.resume` replays the prompt in the same prefill pieces and then the resumed
tokens one at a time, exactly as the first attempt computed them, so the KV caches and the
next sampled token are bit for bit the same; the steps travel in batches
(`inference_glue.replay`). When the new plan handed the lost stage's layers to a neighbour,
the request names the attempt it resumes (`RequestMeta.resume_of`) instead: every stage
takes over that attempt's parked KV caches and the neighbour rebuilds only the layers it
gained (`inference_glue.kv_handoff`); nothing is replayed through the pipeline.

Any number of requests may be in flight: each stage keeps KV caches per request id and works
through its messages one at a time, in arrival order (one worker task).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import anyio

from inference_glue.admission import StaleEpochError, check_request, failure_of
from inference_glue.blas import blas_in_use
from inference_glue.footprint import ModelFootprint, available_memory
from inference_glue.head_exchange import HeadExchange
from inference_glue.kv_handoff import take_over_attempt
from inference_glue.kv_parking import KvParking, SentHidden
from inference_glue.link_watch import LinkLossWatch, LinkLost, LinkLostError
from inference_glue.local_pipeline import prefill_pieces
from inference_glue.messages import (
    ACTIVATION_STREAM,
    HEAD_STREAM,
    REQUEST_STREAM,
    TOKEN_STREAM,
    TOKENS,
    Activation,
    Failure,
    GenerateRequest,
    HeadPart,
    HeadShare,
    Reconfigure,
    Release,
    RequestMeta,
    TokenFeedback,
    encode_message,
)
from inference_glue.node_control import FINISHED, StageControl
from inference_glue.node_counters import NodeCounters
from inference_glue.node_inbox import WORK_QUEUE, NodeInbox, Work
from inference_glue.replay import replay_resumed, run_steps
from inference_glue.stage import PipelineStage, check_stage
from inference_glue.stage_compute import HeadShared, RequestState, StageCompute
from inference_glue.stage_requests import StageRequests
from inference_glue.tensor_codec import damage
from inference_glue.token_publisher import TokenPublisher
from inference_glue.worker import MlxWorker
from router import RouterLike

__all__ = ["NodeCounters", "StageNode", "StaleEpochError", "Work"]

log = logging.getLogger("p2pr.inference.node")


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
        planned: False for a node that holds no layers yet (`stage` is `load_unplanned`'s,
            never computed with): it says so when asked (`InfoReply.num_stages` 0), refuses
            requests, and serves once a client's plan (`Reconfigure`) gives it layers.
    """

    def __init__(
        self,
        router: RouterLike,
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
        planned: bool = True,
    ) -> None:
        check_stage(stage, stage_index, num_stages)
        self.planned = planned
        self.router = router
        self.tokenizer = tokenizer
        self.index = stage_index
        self.num_stages = num_stages
        self.model = model
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.footprint = ModelFootprint.from_dir(model_dir) if model_dir is not None else None
        self.memory_budget = memory_budget if memory_budget is not None else available_memory()
        self.epoch = 0
        self.corrupt_activations = corrupt_activations
        self._fault_rng = random.Random(fault_seed)
        self.counters = NodeCounters()
        self.blas = blas_in_use()
        self.compute = StageCompute(
            stage, worker or MlxWorker("inline"), self.counters, adaptive_head_split
        )
        self.control = StageControl(self, allow_fault_control)
        self.heads = HeadExchange(self)
        self.publisher = TokenPublisher(router, self.counters)
        self._eos = set(tokenizer.eos_token_ids)
        # A dropped request's caches and send log stay parked a while, for a resumed attempt
        # to take over (`kv_handoff`); nothing is kept of caches that no hand-off can take
        # over (sliding windows): it would only hold memory.
        self.parking = KvParking() if stage.caches_cut_back else KvParking(max_parked=0)
        # Through a lambda: a new plan replaces the stage.
        self._requests = StageRequests(lambda rid: self.stage.take_caches(rid), self.parking)
        self.inbox = NodeInbox(router, self.counters)
        self.links = LinkLossWatch(router, self._requests.metas)

    @property
    def stage(self) -> PipelineStage:
        """This node's layers."""
        return self.compute.stage

    @property
    def name(self) -> str:
        """'stage 1 (12D3KooW…)'."""
        return f"stage {self.index} ({self.router.node_id})"

    @property
    def in_flight(self) -> int:
        """Requests this stage holds state for."""
        return len(self._requests)

    async def serve(self) -> None:
        """Serve until cancelled. Registers the token topic first on the last stage."""
        if self.planned and self.stage.is_last and TOKENS.topic not in self.router.topic_routers:
            await self.router.register_topic(TOKENS)
        await self.router.wait_ready()
        self.publisher.name = self.name
        work_send, work_recv = anyio.create_memory_object_stream[Work](WORK_QUEUE)
        async with anyio.create_task_group() as tg:
            for stream in (REQUEST_STREAM, ACTIVATION_STREAM, TOKEN_STREAM, HEAD_STREAM):
                tg.start_soon(self.inbox.pump, stream, work_send.clone())
            tg.start_soon(self.control.pump, work_send.clone())
            tg.start_soon(self.links.run, work_send.clone())
            tg.start_soon(self._worker, work_recv)
            # On every node: a failover may make any of them the last stage.
            tg.start_soon(self.publisher.run)
            work_send.close()

    # -- the worker ------------------------------------------------------------------------

    async def _worker(self, work: anyio.abc.ObjectReceiveStream[Work]) -> None:
        async with work:
            while True:
                await self._handle(await self.inbox.next(work))

    async def _handle(self, item: Work) -> None:
        message = item.message
        meta = message.meta if isinstance(message, GenerateRequest | Activation) else None
        request_id = meta.request_id if meta is not None else getattr(message, "request_id", "?")
        try:
            await self._dispatch(item)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            kind, detail, suspect = failure_of(exc, item.peer)
            if kind == "corrupt":
                self.counters.tensor_checksum_failures += 1
            log.warning("%s: request %r failed (%s): %s", self.name, request_id, kind, detail)
            state = self._requests.drop(request_id)
            self.counters.failed += 1
            meta = state.meta if state is not None else meta
            if meta is not None:
                node_id = self.router.node_id
                failure = Failure(request_id, self.index, node_id, detail, kind, suspect)
                await self.control.report_failure(failure, meta)

    async def _dispatch(self, item: Work) -> None:
        message, stream = item.message, item.stream
        if not self.planned and not isinstance(message, Release | Reconfigure):
            raise ValueError("this node holds no layers yet: it serves once a plan gives it some")
        if isinstance(message, LinkLost):
            state = self._requests.get(message.request_id)
            gone = message.peer not in self.router.connected
            if state is not None and message.peer == state.meta.reply_to and gone:
                return await self.control.abandon(state.meta, "when a token chunk was given up")
            raise LinkLostError(message)
        if isinstance(message, GenerateRequest) and stream == REQUEST_STREAM:
            await self._start(message)
        elif isinstance(message, Activation) and stream == ACTIVATION_STREAM:
            await self._activation(message)
        elif isinstance(message, TokenFeedback) and stream == TOKEN_STREAM:
            await self._token(message)
        elif isinstance(message, HeadShare) and stream == HEAD_STREAM:
            await self.heads.on_share(message, item.peer)
        elif isinstance(message, HeadPart) and stream == HEAD_STREAM:
            await self.heads.on_part(message, item.peer)
        elif isinstance(message, Release):
            self._requests.drop(message.request_id)
            if message.reason == FINISHED:
                self.parking.discard(message.request_id)  # no attempt will resume it
        elif isinstance(message, Reconfigure):
            await self.control.reconfigure(message, item.peer)
        else:
            self.inbox.unexpected(item.peer, message, stream)

    async def _forward(
        self, state: RequestState, inputs: list[int] | bytes, position: int, sample_it: bool
    ) -> bytes | int | HeadShared | None:
        return await self.compute.run(
            self.compute.forward, state, inputs, position, sample_it, self.num_stages
        )

    # -- a request's life ------------------------------------------------------------------

    async def _start(self, request: GenerateRequest) -> None:
        meta = request.meta
        if meta.request_id in self._requests:
            raise ValueError(f"request id {meta.request_id!r} is already in flight")
        check_request(
            request, self.epoch, self.index, self.num_stages, self.router.node_id, self.vocab_size
        )
        state = self._requests.add(RequestState.arrived(meta, self.tokenizer, self.stage.is_last))
        self.counters.requests += 1
        prompt = list(request.prompt_ids)
        if meta.resume_of:
            # The other stages kept their caches: only the last delivered token's step runs.
            need = len(prompt) + len(meta.resume) - 1
            await take_over_attempt(self, meta, need, prompt)
            out = await self._forward(state, [meta.resume[-1]], need, True)
            await self.emit(meta, out, need, True, first=True)
            return
        pieces = prefill_pieces(len(prompt), meta.prefill_step_size)
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1 and not meta.resume
            out = await self._forward(state, prompt[piece.start : piece.stop], piece.start, last)
            await self.emit(meta, out, piece.start, last, first=n == 0)
        # A resumed request: the tokens generated before the failover, one decode step each,
        # as they were first computed (a one-shot prefill would differ in the last bits).
        await replay_resumed(self, state, len(prompt))

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
            self._requests.add(RequestState.arrived(act.meta, self.tokenizer, self.stage.is_last))
            self.counters.requests += 1
            if act.meta.resume_of:
                await take_over_attempt(self, act.meta, act.position, [])
        state = self._requests.get(rid)
        if state is None:
            self.counters.stale_messages += 1
            log.info("%s: activation for unknown request %r dropped", self.name, rid)
            return
        if act.steps:
            out = await run_steps(self, state, act.tensor, act.position, act.sample)
        else:
            out = await self._forward(state, act.tensor, act.position, act.sample)
        first = act.meta is not None
        await self.emit(state.meta, out, act.position, act.sample, first, steps=act.steps)

    async def emit(
        self,
        meta: RequestMeta,
        out: bytes | int | HeadShared | None,
        position: int,
        sample_it: bool,
        first: bool,
        steps: bool = False,
    ) -> None:
        """Send on what a forward of `meta`'s request gave: a hidden state to the next stage
        (the first of the request's with `first`), a sampled token, a share of the head."""
        if isinstance(out, bytes):
            self.parking.record(meta.request_id, SentHidden(position, steps, out))
            if self.corrupt_activations and self._fault_rng.random() < self.corrupt_activations:
                out = damage(out, self._fault_rng)
                self.counters.activations_corrupted += 1
            act_meta = meta if first else None
            payload = encode_message(
                Activation(meta.request_id, position, sample_it, out, act_meta, steps)
            )
            self.counters.bytes_out += len(payload)
            await self.router.send_to(meta.route[self.index + 1], ACTIVATION_STREAM, payload)
            if sample_it and self.index == 0:
                self._requests.sent(meta.request_id, time.perf_counter())
        elif isinstance(out, int):
            await self.sampled(meta.request_id, out)
        elif isinstance(out, HeadShared):
            await self.heads.share(meta, out)

    def request(self, request_id: str) -> RequestState | None:
        """The state of request `request_id` at this stage, if it is in flight."""
        return self._requests.get(request_id)

    async def sampled(self, request_id: str, token: int) -> None:
        """The last stage sampled `token`: back to the first stage, then to the requester."""
        state = self._requests.get(request_id)
        assert state is not None
        meta = state.meta
        position = self.stage.offset(request_id)  # the sampled token's position
        state.generated += 1
        self.counters.tokens_sampled += 1
        finish = state.finish_reason(token, self._eos)
        # A requester that left (without a Release) gets nothing more: stop its request.
        gone = meta.reply_to not in self.router.connected
        done = finish is not None or gone
        feedback = TokenFeedback(request_id, position, token, done)
        if self.num_stages > 1:
            await self.router.send_to(meta.route[0], TOKEN_STREAM, encode_message(feedback))
        elif not done:
            self.inbox.feed(Work(TOKEN_STREAM, self.router.node_id, feedback))
        if gone:
            await self.control.abandon(meta, f"at token {state.generated}")
            return
        assert state.writer is not None
        await self.publisher.put(state.writer.chunk(token, finish), meta)
        if done:
            self.finish(request_id)
            for peer in meta.route[1:-1]:
                await self.control.release(peer, request_id, FINISHED)

    async def _token(self, feedback: TokenFeedback) -> None:
        rid = feedback.request_id
        round_trip = self._requests.returned(rid, time.perf_counter())
        if round_trip is not None:
            self.counters.round_trips += 1
            self.counters.round_trip_seconds += round_trip
        state = self._requests.get(rid)
        if state is None:
            self.counters.stale_messages += 1
            log.info("%s: token for unknown request %r dropped", self.name, rid)
            return
        if feedback.done:
            self.finish(rid)
            return
        out = await self._forward(state, [feedback.token_id], feedback.position, True)
        await self.emit(state.meta, out, feedback.position, True, first=False)

    def finish(self, request_id: str) -> None:
        """The request is done here: drop it and its parked caches."""
        if self._requests.drop(request_id) is not None:
            self.counters.finished += 1
        self.parking.discard(request_id)

    # -- a new plan (StageControl.reconfigure) ---------------------------------------------

    def release_all(self) -> None:
        """Drop every request in flight (a new plan is coming)."""
        self._requests.drop_all()
        self.inbox.clear_own()
