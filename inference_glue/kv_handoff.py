"""A resumed request that takes over its previous attempt's KV caches at one stage, after the
client handed a lost stage's layers to a neighbour (`handoff_plan`, `RequestMeta.resume_of`).

Each stage keeps the caches of the layers it held (`kv_parking`), cut back to the positions
every stage had computed: `need` = the prompt and the delivered tokens but the last, whose
step the pipeline then runs as usual to sample the next token. The neighbour that gained
the lost layers rebuilds their caches here, locally, from what those layers were given the
first time, in the same pieces and one decode step at a time (the same shapes, so the same
bits as the first computation):

- the model's first layers (the first stage was lost): from the tokens, the prompt in its
  prefill pieces and then each delivered token;
- the layers after its own (the next stage was lost): from its log of the hidden states it
  sent that stage.

Anything else (a log given up, caches of another kind, layers that are neither) raises
`HandoffError`; the node fails the request with kind "rebuild" and the client resumes it with
a full replay. `take_over` runs on the node's MLX thread; `take_over_attempt` is the node's
side (the parked state taken, the outcome counted).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import mlx.core as mx

from inference_glue.kv_parking import Parked, SendLog
from inference_glue.local_pipeline import prefill_pieces
from inference_glue.messages import RequestMeta
from inference_glue.stage import PipelineStage
from inference_glue.tensor_codec import decode_tensor

if TYPE_CHECKING:
    from inference_glue.node import StageNode

__all__ = ["HandoffError", "take_over", "take_over_attempt"]


class HandoffError(RuntimeError):
    """The previous attempt's caches cannot be taken over here."""


async def take_over_attempt(
    node: StageNode, meta: RequestMeta, need: int, prompt: Sequence[int]
) -> None:
    """At `node`: take over the KV caches and send log of the attempt `meta` resumes (only
    the same requester's), on the MLX thread."""
    parked = node.parking.take(meta.resume_of, meta.reply_to)
    if parked is not None:
        node.parking.continue_log(meta.request_id, parked.log, need)
    try:
        forwards = await node.compute.run(take_over, node.stage, meta, parked, need, prompt)
    except (HandoffError, anyio.get_cancelled_exc_class()):
        raise
    except Exception as exc:  # caches of a kind that cannot be taken over: replay
        raise HandoffError(f"{type(exc).__name__}: {exc}") from exc
    node.counters.handoffs += 1
    node.counters.rebuild_forwards += forwards


def take_over(
    stage: PipelineStage,
    meta: RequestMeta,
    parked: Parked | None,
    need: int,
    prompt: Sequence[int],
) -> int:
    """Give `meta.request_id` KV caches of `need` positions for every layer of `stage`: the
    parked ones, cut back to `need`, and the gained layers rebuilt. Returns the decode steps
    and prefill pieces run to rebuild them."""
    if parked is None:
        raise HandoffError(f"no KV caches of attempt {meta.resume_of!r} are kept here")
    by_layer = {
        layer: _cut(cache, need, layer)
        for layer, cache in parked.caches.items()
        if layer in stage.layers
    }
    gained = [layer for layer in stage.layers if layer not in by_layer]
    forwards = 0
    if gained:
        run = range(gained[0], gained[-1] + 1)
        if len(run) != len(gained):
            raise HandoffError(f"the layers gained, {gained}, are not one run")
        if run.start == 0 and run.stop == min(parked.caches, default=stage.layers.stop):
            inputs = _from_tokens(meta, prompt, need)
        elif parked.caches and run.start == max(parked.caches) + 1:
            inputs = _from_log(parked.log, need)
        else:
            raise HandoffError(f"nothing here gives the inputs of layers {gained}")
        rebuilt, forwards = _rebuild(stage, run, inputs, need)
        by_layer.update(rebuilt)
    stage.adopt_caches(meta.request_id, by_layer)
    return forwards


def _cut(cache: Any, need: int, layer: int) -> Any:
    """`cache` holding exactly `need` positions (later ones are trimmed)."""
    have = int(cache.offset)
    if have < need:
        raise HandoffError(f"layer {layer} holds {have} positions, {need} are needed")
    if have > need:
        if not cache.is_trimmable():
            raise HandoffError(f"the cache of layer {layer} cannot be cut back")
        cache.trim(have - need)
    return cache


def _from_tokens(
    meta: RequestMeta, prompt: Sequence[int], need: int
) -> Iterator[tuple[int, mx.array]]:
    """The first layer's inputs as first computed: the prompt in its prefill pieces, then
    each delivered token but the last, one step each."""
    for piece in prefill_pieces(len(prompt), meta.prefill_step_size):
        yield piece.start, mx.array([list(prompt[piece.start : piece.stop])])
    for i, token in enumerate(meta.resume[: need - len(prompt)]):
        yield len(prompt) + i, mx.array([[token]])


def _from_log(log: SendLog, need: int) -> Iterator[tuple[int, mx.array]]:
    """The hidden states this stage sent, as the next stage first ran them."""
    if log.overflowed:
        raise HandoffError("the log of hidden states sent was given up (past its bound)")
    for entry in log.entries:
        if entry.position >= need:
            break
        x = decode_tensor(entry.tensor)
        if not entry.steps:
            yield entry.position, x
            continue
        for i in range(min(x.shape[1], need - entry.position)):
            yield entry.position + i, x[:, i : i + 1]


def _rebuild(
    stage: PipelineStage, run: range, inputs: Iterator[tuple[int, mx.array]], need: int
) -> tuple[dict[int, Any], int]:
    """The caches of layers `run` after computing `inputs` through them, in order."""
    view = stage.range_view(run)
    own, full = view.make_caches()
    at = forwards = 0
    for position, x in inputs:
        if position != at or position + x.shape[1] > need:
            raise HandoffError(
                f"the inputs of layer {run.start} jump to position {position} "
                f"(at {at}, {need} needed)"
            )
        view(x, full)  # only the caches are evaluated: the output is not needed
        mx.eval([a for cache in own for a in cache.state if isinstance(a, mx.array)])
        at += x.shape[1]
        forwards += 1
    if at != need:
        raise HandoffError(f"the inputs of layer {run.start} stop at {at} of {need} positions")
    return dict(zip(run, own)), forwards
