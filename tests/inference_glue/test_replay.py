"""A resumed request's replay in batches (`inference_glue.replay`): the same KV caches, hidden
states and next token, bit for bit, as one decode step per message; batches that cover the
tokens once, in order; refused shapes.

Real mlx-lm layers of the tiny model, three stages; the network is left out (the stage nodes
across processes are `test_failover.py`'s).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from inference_glue.messages import Activation, RequestMeta, decode_message, encode_message
from inference_glue.node_counters import NodeCounters
from inference_glue.replay import forward_steps, replay_batches
from inference_glue.sampling import SamplingParams
from inference_glue.stage import load_stage
from inference_glue.stage_compute import RequestState, StageCompute
from inference_glue.tensor_codec import decode_tensor, encode_tensor
from inference_glue.worker import MlxWorker

PROMPT = [1, 17, 42, 7, 99, 3, 250, 12, 5]
RESUME = [64, 3, 900, 17, 17, 401, 2, 77, 310, 8, 45]
SPLITS = (range(0, 3), range(3, 6), range(6, 8))


def computes(model_dir: Path) -> list[StageCompute]:
    return [
        StageCompute(load_stage(model_dir, layers)[0], MlxWorker("inline"), NodeCounters())
        for layers in SPLITS
    ]


def state(request_id: str) -> RequestState:
    meta = RequestMeta(request_id, 64, 0.8, 1.0, 11, 4, ("a", "b", "c"), "client")
    return RequestState(meta, SamplingParams(temp=0.8, top_p=1.0, seed=11))


def prefill(stages: list[StageCompute], st: RequestState) -> None:
    """The prompt in pieces of 4, through the three stages, nothing sampled."""
    for start in range(0, len(PROMPT), 4):
        out: object = PROMPT[start : start + 4]
        for compute in stages:
            out = compute.forward(st, out, start, False, len(stages))  # type: ignore[arg-type]


def caches(compute: StageCompute, request_id: str) -> list[bytes]:
    held = compute.stage.cache_state(request_id)
    return [encode_tensor(a) for a in held if isinstance(a, mx.array)]


def test_batched_steps_equal_one_step_per_message_bit_for_bit(tiny_8_layers: Path) -> None:
    stages = computes(tiny_8_layers)
    one, batched = state("one"), state("batched")
    prefill(stages, one)
    prefill(stages, batched)
    position = len(PROMPT)
    # One decode step per message, as before batches: hidden states as codec bytes.
    hidden: list[bytes] = []
    token_one: object = None
    for i, token in enumerate(RESUME):
        out: object = [token]
        for n, compute in enumerate(stages):
            out = compute.forward(one, out, position + i, i == len(RESUME) - 1, 3)  # type: ignore[arg-type]
            if n == 0:
                hidden.append(out)  # type: ignore[arg-type]
        token_one = out
    # Batches of 4, 4, 3 steps: one message per batch and stage.
    token_batched: object = None
    firsts: list[bytes] = []
    for batch in replay_batches(len(RESUME), 4):
        sample = batch.stop == len(RESUME)
        out = [RESUME[i] for i in batch]
        for n, compute in enumerate(stages):
            out = forward_steps(compute, batched, out, position + batch.start, sample, 3)  # type: ignore[arg-type]
            if n == 0:
                firsts.append(out)  # type: ignore[arg-type]
        token_batched = out
    assert isinstance(token_one, int) and token_batched == token_one
    for compute in stages:
        assert compute.stage.offset("batched") == position + len(RESUME)
        assert caches(compute, "batched") == caches(compute, "one")
    # The first stage's batched output is its step outputs side by side, bit for bit.
    joined = mx.concatenate([decode_tensor(h) for h in hidden], axis=1)
    assert encode_tensor(joined) == encode_tensor(
        mx.concatenate([decode_tensor(f) for f in firsts], axis=1)
    )


def test_replay_batches_cover_the_tokens_once_in_order() -> None:
    for count in (1, 5, 63, 64, 65, 1000):
        batches = replay_batches(count)
        assert [i for b in batches for i in b] == list(range(count))
        assert all(1 <= len(b) <= 64 for b in batches)
    assert replay_batches(0) == []
    with pytest.raises(ValueError):
        replay_batches(3, 0)


def test_a_replay_batch_of_the_wrong_shape_is_refused(tiny_8_layers: Path) -> None:
    stages = computes(tiny_8_layers)
    st = state("r")
    prefill(stages[:1], st)
    flat = encode_tensor(mx.zeros((2, 3, 128)))
    with pytest.raises(ValueError, match="one sequence"):
        forward_steps(stages[1], st, flat, 0, False, 3)
    # The flag travels on the wire.
    act = Activation("r", 9, True, encode_tensor(mx.zeros((1, 2, 128))), steps=True)
    assert decode_message(encode_message(act)) == act
