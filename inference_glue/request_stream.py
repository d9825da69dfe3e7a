"""One request's token stream, from its submission to its last chunk, across failovers.

The request goes to the first stage of the current plan; its chunks come back (in any
order, possibly more than once) and go through a `TokenStreamAssembler`, which yields them
complete and in order. Whatever else wakes the stream (a stage's `Failure`, a connection
event, a protocol verdict, or time) goes to the `FailoverDriver`; when it says fail over,
the request is resubmitted under a new wire id (`<id>~<attempt>`) with the tokens already
delivered, and the stream goes on at the next seq. At the end the joined text is checked
against mlx-lm's own streaming detokenizer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import anyio
import attrs

from inference_glue.client_inbox import ClientInbox, StreamItem
from inference_glue.failover import attempt_id
from inference_glue.failover_driver import FailoverDriver, StreamWatch
from inference_glue.messages import (
    REQUEST_STREAM,
    Failure,
    GenerateRequest,
    RequestMeta,
    encode_message,
)
from inference_glue.planner import Planner
from inference_glue.stream_checks import check_stream_text
from inference_glue.tokens import AssemblerStats, TokenChunk, TokenStreamAssembler, decode_rate

__all__ = ["GenerationResult", "RequestOptions", "RequestStream"]


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
        return decode_rate(len(self.token_ids), self.ttft_s, self.elapsed_s)


@attrs.frozen
class RequestOptions:
    """What a request asks for, the same in every attempt."""

    max_tokens: int
    temp: float
    top_p: float
    seed: int | None
    prefill_step_size: int
    chunks: str  # "direct" or "topic"
    idle_timeout: float


class RequestStream:
    """One request of a client (see the module docstring).

    Args:
        planner, failover, inbox: the client's.
        tokenizer: the model's (the text check).
        head_split: the rows of the LM head the last stage computes itself under the
            current plan (0: no split).
    """

    def __init__(
        self,
        planner: Planner,
        failover: FailoverDriver,
        inbox: ClientInbox,
        tokenizer: Any,
        head_split: Callable[[], int],
    ) -> None:
        self.planner = planner
        self.failover = failover
        self.inbox = inbox
        self.tokenizer = tokenizer
        self._head_split = head_split
        self.stats: AssemblerStats | None = None

    async def chunks(
        self, request_id: str, prompt_ids: Sequence[int], options: RequestOptions
    ) -> AsyncGenerator[TokenChunk, None]:
        """Submit the request and yield its chunks in order as they become complete."""
        meta = await self.planner.begin(lambda: self._meta(request_id, options, ()))
        # The text is checked below against mlx-lm's own streaming detokenizer (what
        # stream_generate yields), not against tokenizer.decode: the two differ for a NUL byte.
        assembler = TokenStreamAssembler(request_id, source=self.planner.stages[-1].label)
        send, recv = self.inbox.open(request_id)
        watch = StreamWatch(self.planner.router)
        policy = self.planner.policy
        try:
            await self._submit(meta, prompt_ids)
            while not assembler.complete:
                item: StreamItem | None = None
                # Connections, failures and protocol verdicts wake this at once; only a hung
                # stage is found by time (phi accrual), looked at this often.
                with anyio.move_on_after(policy.health_interval):
                    item = await recv.receive()
                if isinstance(item, TokenChunk):
                    for chunk in self.failover.delivered(watch, assembler.add(item), meta.route):
                        yield chunk
                    continue
                failure = item if isinstance(item, Failure) else None
                trouble = await self.failover.trouble(
                    watch, failure, meta, assembler, options.idle_timeout
                )
                if trouble is not None:
                    key = attempt_id(request_id, watch.attempt)
                    recovery = await self.failover.failover(watch, meta, assembler, trouble, key)
                    del self.inbox.streams[meta.request_id]
                    resume = [c.token_id for c in assembler.chunks]
                    # Taking over the caches needs a token to run: none delivered, replay.
                    of = meta.request_id if recovery.handoff and resume else ""
                    meta = self._meta(key, options, resume, of)
                    self.inbox.streams[meta.request_id] = send
                    watch.restart()
                    await self._submit(meta, prompt_ids)
            check_stream_text(self.tokenizer, assembler)
        finally:
            self.planner.end()
            self.inbox.streams.pop(meta.request_id, None)
            self.stats = assembler.stats
            if not assembler.complete:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await self.planner.release(meta, "abandoned by the client")

    def _meta(
        self, key: str, options: RequestOptions, resume: Sequence[int], resume_of: str = ""
    ) -> RequestMeta:
        """The request's meta for the current plan, under wire id `key`, resuming after the
        tokens `resume` (taking over the KV caches of attempt `resume_of`, if given)."""
        return RequestMeta(
            key,
            options.max_tokens,
            options.temp,
            options.top_p,
            options.seed,
            options.prefill_step_size,
            tuple(s.node_id for s in self.planner.stages),
            self.planner.router.node_id,
            options.chunks,
            epoch=self.planner.epoch,
            resume=tuple(resume),
            head_split=self._head_split(),
            resume_of=resume_of,
        )

    async def _submit(self, meta: RequestMeta, prompt_ids: Sequence[int]) -> None:
        request = GenerateRequest(meta, tuple(prompt_ids))
        await self.planner.router.send_to(meta.route[0], REQUEST_STREAM, encode_message(request))
