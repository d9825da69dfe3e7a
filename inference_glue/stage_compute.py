"""The MLX side of a stage node: one forward of its layers per message, the split LM head,
and sampling. No network here: `StageNode` hands it inputs and sends what it returns.

Every call runs on the node's MLX thread (`MlxWorker`), one at a time, in arrival order;
arrays are made there, since MLX streams belong to one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar, cast

import attrs
import mlx.core as mx

from inference_glue.head_split import HeadSplitTuner
from inference_glue.messages import RequestMeta
from inference_glue.node_counters import NodeCounters
from inference_glue.sampling import SamplingParams, logprobs_from_logits, sample
from inference_glue.stage import PipelineStage
from inference_glue.tensor_codec import decode_tensor, encode_tensor
from inference_glue.tokens import TokenStreamWriter
from inference_glue.worker import MlxWorker

__all__ = ["HeadShared", "PendingHead", "RequestState", "StageCompute"]

T = TypeVar("T")


@attrs.define
class PendingHead:
    """The last stage's part of a split head: its logits (rows `0 .. rows - 1`, being
    computed from `started`, perf_counter seconds), the input's position and length, and
    whether the tuner times this token."""

    own: mx.array
    position: int
    length: int
    rows: int
    started: float
    timed: bool = False


@attrs.define
class RequestState:
    """A request in flight at this stage."""

    meta: RequestMeta
    params: SamplingParams
    writer: TokenStreamWriter | None = None
    generated: int = 0
    # Last stage, split LM head: its own part, until the first stage's part arrives.
    head: PendingHead | None = None

    @classmethod
    def arrived(cls, meta: RequestMeta, tokenizer: Any, is_last: bool) -> RequestState:
        """The state of a request as it arrives (the last stage detokenizes, following on
        from the tokens delivered before a failover, `meta.resume`)."""
        params = SamplingParams(temp=meta.temp, top_p=meta.top_p, seed=meta.seed)
        writer = TokenStreamWriter(meta.request_id, tokenizer, meta.resume) if is_last else None
        return cls(meta, params, writer, generated=len(meta.resume))

    def finish_reason(self, token: int, eos: Collection[int]) -> str | None:
        """Why the request ends with `token`, its `generated`-th: "stop" (an end of
        sequence), "length" (the last token allowed), or None (it goes on)."""
        if token in eos:
            return "stop"
        return "length" if self.generated == self.meta.max_tokens else None


@attrs.frozen
class HeadShared:
    """What the last stage's forward gives when the first stage computes part of the head:
    the hidden state to send it, the rows the last stage computes itself, and the position
    of that hidden state's first token (what the first stage's `HeadPart` must name: not the
    position of a replay batch, whose last step alone is sampled)."""

    hidden: bytes
    rows: int
    position: int


class StageCompute:
    """A stage's layers and the MLX calls on them.

    Args:
        stage: the layers (`load_stage`), replaced on a new plan (`stage` is settable).
        worker: where the MLX work runs.
        counters: what the compute did.
        adaptive_head_split: as the last stage, move the cut of a split LM head with what
            it measures (`HeadSplitTuner`); False keeps the client's cut for every token.
    """

    def __init__(
        self,
        stage: PipelineStage,
        worker: MlxWorker,
        counters: NodeCounters,
        adaptive_head_split: bool = True,
    ) -> None:
        self.stage = stage
        self.worker = worker
        self.counters = counters
        self.adaptive_head_split = adaptive_head_split
        self.head_tuner: HeadSplitTuner | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the MLX thread, its time counted as compute."""
        start = time.perf_counter()
        try:
            return await self.worker.run(fn, *args)
        finally:
            self.counters.compute_seconds += time.perf_counter() - start

    def forward(
        self,
        state: RequestState,
        inputs: Sequence[int] | bytes | mx.array,
        position: int,
        sample_it: bool,
        num_stages: int,
    ) -> bytes | int | HeadShared | None:
        """One forward of this stage: codec bytes for the next stage, a sampled token id
        (last stage, `sample_it`), the hidden state for the first stage (last stage,
        `sample_it`, split head) or None (last stage, prefill piece: caches only)."""
        request_id = state.meta.request_id
        x = self._input(request_id, inputs, position)
        split, timed = (
            self._head_plan(state.meta, x, num_stages)
            if sample_it and self.stage.is_last
            else (0, False)
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
            shared = HeadShared(encode_tensor(out), split, position)
            own = self.stage.head_rows(out, range(0, split))
            mx.async_eval(own)
            state.head = PendingHead(own, position, out.shape[1], split, time.perf_counter(), timed)
            return shared
        return self._sample_whole(state.params, out, position, timed)

    def hidden(
        self, state: RequestState, inputs: Sequence[int] | bytes | mx.array, position: int
    ) -> mx.array:
        """A stage that is not the last: its output for `inputs`, evaluated (the step a
        replay batch is made of, see `inference_glue.replay`)."""
        request_id = state.meta.request_id
        out = self.stage.forward(request_id, self._input(request_id, inputs, position))
        self.counters.forwards += 1
        mx.eval(out)
        return out

    def _input(
        self, request_id: str, inputs: Sequence[int] | bytes | mx.array, position: int
    ) -> mx.array:
        """`inputs` as an array, after checking that they continue the KV caches."""
        have = self.stage.offset(request_id)
        if have > position:
            self.counters.duplicate_deliveries += 1
        if have != position:
            raise RuntimeError(
                f"request {request_id!r}: this stage holds {have} tokens of KV cache but the "
                f"input starts at position {position}"
            )
        # Arrays are made here, on the MLX thread: MLX streams belong to one thread.
        if isinstance(inputs, bytes):
            return decode_tensor(inputs)
        return inputs if isinstance(inputs, mx.array) else mx.array(list(inputs))

    def _sample_whole(
        self, params: SamplingParams, out: mx.array, position: int, timed: bool
    ) -> int:
        """The last stage samples from its whole head (timed, for the tuner, as a split one
        is: from the final hidden state to the sampled token)."""
        start = None
        if timed:
            mx.eval(out)
            start = time.perf_counter()
            out = self.stage.head(out)
        logprobs = logprobs_from_logits(out[:, -1, :])
        token = cast(int, sample(logprobs, params, position + out.shape[1]).item())
        if start is not None:
            assert self.head_tuner is not None
            self.head_tuner.observe_whole(time.perf_counter() - start)
        return token

    def _head_plan(self, meta: RequestMeta, inputs: mx.array, num_stages: int) -> tuple[int, bool]:
        """For a token the last stage samples: the rows of the head it computes itself while
        the first stage computes the rest (0: no split, it computes them all), and whether
        the tuner times this token's head (decode steps only, on an adaptive node)."""
        if not meta.head_split or num_stages < 2:
            return 0, False
        if not self.adaptive_head_split:
            return meta.head_split, False
        # Only the worker calls this and the tuner's observers, one item at a time.
        if self.head_tuner is None:
            self.head_tuner = HeadSplitTuner(self.stage.vocab_size, meta.head_split)
        rows = self.head_tuner.next_rows()
        return (rows if rows < self.stage.vocab_size else 0), inputs.shape[-2] == 1

    def head_rows_last(self, hidden: bytes, row_start: int) -> bytes:
        """First stage: logits of rows `row_start ..` at the last position, codec bytes."""
        h = decode_tensor(hidden)
        logits = self.stage.head_rows(h, range(row_start, self.stage.vocab_size))
        return encode_tensor(logits[:, -1, :])

    def sample_joined(
        self, params: SamplingParams, own: mx.array, other: bytes, position: int
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
        token = cast(int, sample(logprobs_from_logits(logits), params, position).item())
        return token, own_wait
