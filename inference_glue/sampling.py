"""Deterministic token sampling: greedy, or seeded with a key that depends only on (seed, position).

A replay of a request, on any node, after any failover, samples the same tokens: the random
key for the token at sequence position `p` is derived from `(seed, p)` alone, never from
MLX's global random state or from how many requests ran before.

The same functions serve as mlx-lm's `sampler=` (see `PositionalSampler`), so a single-process
`mlx_lm.generate_step` run is the reference that a pipelined run must reproduce bit for bit.
"""

from __future__ import annotations

import struct

import attrs
import mlx.core as mx
import xxhash
from mlx_lm.sample_utils import apply_top_p

__all__ = [
    "PositionalSampler",
    "SamplingParams",
    "logprobs_from_logits",
    "sample",
    "sampling_key",
]

_SEED_POSITION = struct.Struct("<QQ")


@attrs.frozen
class SamplingParams:
    """How to pick tokens: greedy when `temp == 0`, else seeded sampling at temperature `temp`.

    `top_p < 1` keeps the smallest set of most likely tokens whose probability reaches
    `top_p` (nucleus sampling, mlx-lm's `apply_top_p`). Sampling needs a seed (0 to 2**64 - 1):
    only deterministic, replayable sampling is offered.
    """

    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temp > 0 and self.seed is None:
            raise ValueError("sampling with temp > 0 needs a seed (deterministic mode)")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax."""
        return self.temp == 0


def sampling_key(seed: int, position: int) -> mx.array:
    """The PRNG key for the token at sequence `position` (0-based, prompt included).

    MLX has no fold-in, so `(seed, position)` is hashed with xxh3-64 into a 64-bit seed for
    `mx.random.key`.
    """
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    return mx.random.key(xxhash.xxh3_64_intdigest(_SEED_POSITION.pack(seed, position)))


def logprobs_from_logits(logits: mx.array) -> mx.array:
    """Log-probabilities from the last position's logits `(1, vocab)`, as mlx-lm computes them.

    This is `generate_step`'s own expression; the same arithmetic on both sides keeps the
    sampled tokens bit-identical, ties included.
    """
    return logits - mx.logsumexp(logits, keepdims=True)


def sample(logprobs: mx.array, params: SamplingParams, position: int) -> mx.array:
    """Pick the token at sequence `position` from `logprobs` `(1, vocab)`; returns shape `(1,)`.

    Greedy is `mx.argmax`, exactly mlx-lm's `greedy_sampler`.
    """
    if params.greedy:
        return mx.argmax(logprobs, axis=-1)
    assert params.seed is not None  # checked by SamplingParams
    if params.top_p < 1:
        logprobs = apply_top_p(logprobs, params.top_p)
    key = sampling_key(params.seed, position)
    return mx.random.categorical(logprobs * (1.0 / params.temp), key=key)


class PositionalSampler:
    """`sample` as an mlx-lm `sampler=` callable, for `generate_step` and `stream_generate`.

    mlx-lm calls the sampler once per generated token, in order (its one-step look-ahead
    does not reorder the calls), and passes no position; this counts the calls, starting at
    `start_position` = the prompt's length, which is the position of the first new token.
    """

    def __init__(self, params: SamplingParams, start_position: int) -> None:
        self.params = params
        self.position = start_position

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Sample the next token and advance the position."""
        token = sample(logprobs, self.params, self.position)
        self.position += 1
        return token
