"""A resumed request's replay in batches: the tokens delivered before a failover run one
decode step at a time, exactly as they were first computed, but travel between stages
`REPLAY_BATCH` steps to a message (`Activation.steps`) instead of one message per step.

Why batches: a one-shot prefill of the delivered tokens would differ in the last bits from
what the step-by-step decode computed, so each stage must still run them one step at a time
(the same shapes, so the same kernels and the same bits). What made recovery grow with the
answer was not that compute but a message, a network hop and a wake-up per token at every
stage. A batch of steps costs one message per stage; each stage starts on a batch as soon as
it comes, so the stages work on successive batches at the same time.

`forward_steps` runs on the node's MLX thread (`StageCompute.run`); `replay_resumed` and
`run_steps` are the node's side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import mlx.core as mx

from inference_glue.stage_compute import HeadShared, RequestState, StageCompute
from inference_glue.tensor_codec import decode_tensor, encode_tensor

if TYPE_CHECKING:
    from inference_glue.node import StageNode

__all__ = ["REPLAY_BATCH", "forward_steps", "replay_batches", "replay_resumed", "run_steps"]

# Decode steps per replay message: large enough that per-message costs vanish, small enough
# that the next stage starts early (and that a batch of a large model's hidden states, e.g.
# 64 x 8192 x 4 B = 2 MiB, stays a modest message).
REPLAY_BATCH = 64


def replay_batches(count: int, batch: int = REPLAY_BATCH) -> list[range]:
    """The indexes of `count` resumed tokens, `batch` at a time, in order."""
    if batch < 1:
        raise ValueError(f"a replay batch holds at least one step, not {batch}")
    return [range(start, min(start + batch, count)) for start in range(0, count, batch)]


async def replay_resumed(node: StageNode, state: RequestState, start: int) -> None:
    """At the first stage `node`: run the tokens `state`'s request delivered before the
    failover from position `start`, a batch of decode steps at a time, and send each batch
    on. Nothing is sampled until the last of them, whose output gives the next new token."""
    meta = state.meta
    for batch in replay_batches(len(meta.resume)):
        if node.request(meta.request_id) is None:
            return  # released meanwhile (a single-stage node samples inline)
        position = start + batch.start
        last = batch.stop == len(meta.resume)
        tokens = list(meta.resume[batch.start : batch.stop])
        out = await run_steps(node, state, tokens, position, last)
        node.counters.replayed_tokens += len(tokens)
        await node.emit(meta, out, position, last, first=False, steps=True)


async def run_steps(
    node: StageNode,
    state: RequestState,
    inputs: list[int] | bytes,
    position: int,
    sample_last: bool,
) -> bytes | int | HeadShared | None:
    """`forward_steps` on `node`'s MLX thread, counted."""
    node.counters.replay_batches += 1
    return await node.compute.run(
        forward_steps, node.compute, state, inputs, position, sample_last, node.num_stages
    )


def forward_steps(
    compute: StageCompute,
    state: RequestState,
    inputs: Sequence[int] | bytes,
    position: int,
    sample_last: bool,
    num_stages: int,
) -> bytes | int | HeadShared | None:
    """Run the positions of `inputs` (token ids on the first stage, a hidden state
    `(1, L, hidden)` on the others) as L decode steps from `position`, one at a time.

    Returns what `StageCompute.forward` returns for a message: on a stage that is not the
    last, the L outputs as one hidden state `(1, L, hidden)` (codec bytes) for the next stage;
    on the last stage, what the last step gives (a sampled token, the split head's share, or
    None when `sample_last` is False: the steps only fill the KV caches).
    """
    x = decode_tensor(inputs) if isinstance(inputs, bytes) else mx.array([list(inputs)])
    steps = x.shape[1] if x.ndim >= 2 else 0
    if x.ndim not in (2, 3) or x.shape[0] != 1 or steps < 1:
        raise ValueError(f"replay steps come as one sequence (1, L[, hidden]), got {x.shape}")
    if compute.stage.is_last:
        for i in range(steps - 1):
            compute.forward(state, x[:, i : i + 1], position + i, False, num_stages)
        return compute.forward(
            state, x[:, steps - 1 :], position + steps - 1, sample_last, num_stages
        )
    outs = [compute.hidden(state, x[:, i : i + 1], position + i) for i in range(steps)]
    return encode_tensor(mx.concatenate(outs, axis=1))
