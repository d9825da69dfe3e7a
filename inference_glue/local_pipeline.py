"""Single-process reference generation and an in-process pipeline that must match it bit for bit.

`generate_single` is mlx-lm's own `stream_generate` over the whole model. `generate_pipelined`
runs the same request through `PipelineStage`s, passing every hidden state between stages
as `tensor_codec` bytes, exactly what a node would send to the next one, and the sampled
token back to the first stage. Both return a `Generation`; for the same model, prompt and
sampling parameters their token ids and chunks are identical.

What bit-exactness needs, and what both sides here therefore share:
- the prompt is processed as `generate_step` does it: `prompt[:-1]` in pieces of
  `prefill_step_size` tokens, then the last prompt token alone (`prefill_pieces`);
- the log-probabilities and the sampler are the same functions (`inference_glue.sampling`);
  for greedy decoding the reference uses mlx-lm's own `greedy_sampler`;
- the same BLAS and thread count (see `inference_glue.blas`), which within one process holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx_lm
from mlx_lm.generate import stream_generate

from inference_glue.sampling import (
    PositionalSampler,
    SamplingParams,
    logprobs_from_logits,
    sample,
)
from inference_glue.stage import PipelineStage, stages_for
from inference_glue.tensor_codec import decode_tensor, encode_tensor
from inference_glue.tokens import TokenChunk, TokenStreamWriter

__all__ = [
    "DEFAULT_PREFILL_STEP_SIZE",
    "Generation",
    "LocalPipeline",
    "ModelSource",
    "generate_pipelined",
    "generate_single",
    "prefill_pieces",
    "prompt_token_ids",
]

# mlx-lm's generate_step default.
DEFAULT_PREFILL_STEP_SIZE = 2048

# A model directory, or a (model, tokenizer) pair from `mlx_lm.load` to avoid loading twice.
ModelSource = str | Path | tuple[Any, Any]


@attrs.frozen
class Generation:
    """The result of one generation: prompt and generated token ids, and the token chunks."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    chunks: tuple[TokenChunk, ...]

    @property
    def text(self) -> str:
        """The generated text: the chunks' texts joined."""
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def finish_reason(self) -> str | None:
        """'stop' (end-of-sequence token) or 'length' (max_tokens reached)."""
        return self.chunks[-1].finish_reason if self.chunks else None


def _load(source: ModelSource) -> tuple[Any, Any]:
    if isinstance(source, tuple):
        return source
    loaded = mlx_lm.load(str(source))
    return loaded[0], loaded[1]


def prompt_token_ids(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of `prompt`, encoded as `stream_generate` encodes a string prompt."""
    if not isinstance(prompt, str):
        return [int(token) for token in prompt]
    # stream_generate's rule: add special tokens unless the prompt already starts with BOS.
    bos = tokenizer.bos_token
    ids: list[int] = tokenizer.encode(
        prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
    )
    return ids


def prefill_pieces(prompt_length: int, prefill_step_size: int) -> list[range]:
    """The pieces in which `generate_step` feeds a prompt to the model.

    `prompt[:-1]` in pieces of at most `prefill_step_size` tokens, then the last token
    alone; the logits of that last call give the first generated token.
    """
    if prompt_length < 1:
        raise ValueError("the prompt must have at least one token")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    pieces = [
        range(start, min(start + prefill_step_size, prompt_length - 1))
        for start in range(0, prompt_length - 1, prefill_step_size)
    ]
    pieces.append(range(prompt_length - 1, prompt_length))
    return pieces


def generate_single(
    model: ModelSource,
    prompt: str | Sequence[int],
    max_tokens: int,
    seed: int | None = None,
    temp: float = 0.0,
    *,
    top_p: float = 1.0,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    request_id: str = "single",
) -> Generation:
    """Generate with mlx-lm's `stream_generate` over the whole model: the reference.

    Greedy (`temp == 0`) uses mlx-lm's own argmax sampler; seeded sampling plugs
    `PositionalSampler` into `stream_generate`'s `sampler=`, so that the reference for
    sampling is "the same sampler over the unsplit model".
    """
    params = SamplingParams(temp=temp, top_p=top_p, seed=seed)
    net, tokenizer = _load(model)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    sampler = None if params.greedy else PositionalSampler(params, len(prompt_ids))
    chunks = [
        TokenChunk.create(request_id, seq, response.token, response.text, response.finish_reason)
        for seq, response in enumerate(
            stream_generate(
                net,
                tokenizer,
                prompt_ids,
                max_tokens,
                sampler=sampler,
                prefill_step_size=prefill_step_size,
            )
        )
    ]
    return Generation(tuple(prompt_ids), tuple(chunk.token_id for chunk in chunks), tuple(chunks))


class LocalPipeline:
    """Pipeline stages run in one process, with hidden states passed as codec bytes.

    Requests are independent (each stage keeps KV caches per request id), so several
    `generate` iterators may be advanced in any interleaving.
    """

    def __init__(self, stages: Sequence[PipelineStage], tokenizer: Any) -> None:
        self.stages = list(stages)
        self.tokenizer = tokenizer
        self.bytes_sent = 0

    def run(self, request_id: str, tokens: mx.array) -> mx.array:
        """Feed `tokens` through every stage; return the last stage's logits (lazily)."""
        x = tokens
        for stage in self.stages[:-1]:
            wire = encode_tensor(stage.forward(request_id, x))
            self.bytes_sent += len(wire)
            x = decode_tensor(wire)
        return self.stages[-1].forward(request_id, x)

    def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    ) -> Iterator[TokenChunk]:
        """Yield the request's token chunks, one per generated token, as `stream_generate`.

        The request's KV caches are released on every stage when the iterator ends.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        prompt = mx.array(list(prompt_ids))
        pieces = prefill_pieces(len(prompt_ids), prefill_step_size)
        writer = TokenStreamWriter(request_id, self.tokenizer)
        eos_ids = self.tokenizer.eos_token_ids
        try:
            for piece in pieces[:-1]:
                self.run(request_id, prompt[piece.start : piece.stop])
                mx.eval(self.stages[-1].cache_state(request_id))
            logits = self.run(request_id, prompt[pieces[-1].start :])
            # The sampled token's position in the sequence, prompt included.
            position = len(prompt_ids)
            for n in range(max_tokens):
                sampled = sample(logprobs_from_logits(logits[:, -1, :]), params, position)
                token = cast(int, sampled.item())
                if token in eos_ids:
                    yield writer.chunk(token, "stop")
                    return
                if n + 1 == max_tokens:
                    yield writer.chunk(token, "length")
                    return
                yield writer.chunk(token)
                # The token goes back to the first stage.
                logits = self.run(request_id, mx.array([token]))
                position += 1
        finally:
            for stage in self.stages:
                stage.release(request_id)


def generate_pipelined(
    model: ModelSource,
    prompt: str | Sequence[int],
    splits: Sequence[range],
    max_tokens: int,
    seed: int | None = None,
    temp: float = 0.0,
    *,
    top_p: float = 1.0,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    request_id: str = "pipelined",
) -> Generation:
    """Generate through one `PipelineStage` per layer range of `splits` (contiguous, covering
    all layers), hidden states crossing each stage boundary as `tensor_codec` bytes."""
    params = SamplingParams(temp=temp, top_p=top_p, seed=seed)
    net, tokenizer = _load(model)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    pipeline = LocalPipeline(stages_for(net, splits), tokenizer)
    chunks = list(pipeline.generate(request_id, prompt_ids, max_tokens, params, prefill_step_size))
    return Generation(tuple(prompt_ids), tuple(chunk.token_id for chunk in chunks), tuple(chunks))
