"""One pipeline stage: a contiguous range of a llama-style mlx-lm model's layers.

The first stage embeds token ids, the last one applies the final norm and the LM head (the
transposed embedding when the embeddings are tied); every stage keeps its own KV caches per
request. The computation is mlx-lm's `LlamaModel.__call__` cut at layer boundaries, with
mlx-lm's own mask and cache helpers, so the stages chained together compute bit for bit
what the whole model computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

__all__ = ["PipelineStage", "load_stage", "load_stage_layers", "restage", "stages_for"]


class PipelineStage:
    """Layers `layers` of `model`, with per-request KV caches.

    Args:
        model: a loaded mlx-lm model with llama's layout (`model.model.embed_tokens`,
            `.layers`, `.norm`, and `lm_head` unless the embeddings are tied).
        layers: the layer range, e.g. `range(0, 15)`; the stage is first if it starts at
            layer 0 and last if it ends at the model's last layer.
    """

    def __init__(self, model: nn.Module, layers: range) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not all(
            hasattr(inner, name) for name in ("embed_tokens", "layers", "norm")
        ):
            raise TypeError(
                f"{type(model).__name__} does not have llama's layout "
                f"(model.embed_tokens, model.layers, model.norm)"
            )
        total = len(inner.layers)
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= total:
            raise ValueError(f"layer range {layers} is not a non-empty part of 0..{total}")
        self.layers = layers
        self.num_model_layers = total
        self.is_first = layers.start == 0
        self.is_last = layers.stop == total
        self._model = model
        self._blocks = inner.layers[layers.start : layers.stop]
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._tied = bool(getattr(model.args, "tie_word_embeddings", False))
        self._window = getattr(inner, "sliding_window", None)
        # As in LlamaModel: one mask for full-attention layers, one for sliding-window layers,
        # each made from the cache of the first such layer (here: of this stage).
        sliding = [bool(getattr(block, "use_sliding", False)) for block in self._blocks]
        self._sliding = sliding
        self._full_index = sliding.index(False) if False in sliding else None
        self._window_index = sliding.index(True) if True in sliding else None
        self._caches: dict[str, list[Any]] = {}

    def parameters(self) -> list[mx.array]:
        """The weights this stage uses (and only those)."""
        modules: list[Any] = list(self._blocks)
        if self.is_first or (self.is_last and self._tied):
            modules.append(self._embed)
        if self.is_last:
            modules.append(self._norm)
            if not self._tied:
                modules.append(self._model.lm_head)
        return [
            array
            for module in modules
            for _, array in cast(list[tuple[str, mx.array]], tree_flatten(module.parameters()))
        ]

    @property
    def request_ids(self) -> list[str]:
        """The requests that hold KV caches on this stage."""
        return list(self._caches)

    def offset(self, request_id: str) -> int:
        """How many tokens of `request_id` this stage has processed (0 if none)."""
        caches = self._caches.get(request_id)
        return int(caches[0].offset) if caches else 0

    def cache_state(self, request_id: str) -> list[mx.array]:
        """The KV cache arrays of `request_id`, to `mx.eval` after a prefill chunk."""
        return [array for cache in self._caches.get(request_id, []) for array in cache.state]

    def release(self, request_id: str) -> None:
        """Drop the KV caches of `request_id` (no error if it has none)."""
        self._caches.pop(request_id, None)

    def forward(self, request_id: str, inputs: mx.array, *, head: bool = True) -> mx.array:
        """Run this stage's layers for the next tokens of `request_id`.

        Args:
            inputs: on the first stage, token ids `(L,)` or `(B, L)`; on the others, the
                previous stage's output `(B, L, hidden)`.
            head: on the last stage, False stops after the final norm: the hidden state
                whose logits `head_rows` computes in parts.

        Returns:
            The hidden state `(B, L, hidden)` for the next stage, or on the last stage the
            logits `(B, L, vocab)`. Its layers are already being computed in the
            background (`mx.async_eval`); reading the result waits for them. The caches of a
            new request are made on its first call, with mlx-lm's `make_prompt_cache`.
        """
        caches = self._caches.get(request_id)
        if caches is None:
            caches = make_prompt_cache(self._model)[self.layers.start : self.layers.stop]
            self._caches[request_id] = caches
        if self.is_first:
            if inputs.ndim == 1:
                inputs = inputs[None]
            if inputs.ndim != 2 or not mx.issubdtype(inputs.dtype, mx.integer):
                raise ValueError(
                    f"the first stage takes token ids (L,) or (B, L), got {inputs.dtype} "
                    f"{inputs.shape}"
                )
            h: mx.array = self._embed(inputs)
        else:
            if inputs.ndim != 3 or not mx.issubdtype(inputs.dtype, mx.floating):
                raise ValueError(
                    f"stage {self.layers} takes a hidden state (B, L, hidden), got "
                    f"{inputs.dtype} {inputs.shape}"
                )
            h = inputs

        full_mask = (
            create_attention_mask(h, caches[self._full_index])
            if self._full_index is not None
            else None
        )
        window_mask = (
            create_attention_mask(h, caches[self._window_index], window_size=self._window)
            if self._window_index is not None
            else None
        )
        for block, cache, sliding in zip(self._blocks, caches, self._sliding):
            h = block(h, window_mask if sliding else full_mask, cache=cache)
            # Start computing each layer as soon as it is built, so that building the next
            # one in Python overlaps the computation (mlx-lm's generate overlaps whole steps
            # the same way). The same kernels run in the same order: the result is identical.
            mx.async_eval(h)

        if not self.is_last:
            return h
        h = self._norm(h)
        return self.head(h) if head else h

    def head(self, hidden: mx.array) -> mx.array:
        """The LM head: logits for final (normed) hidden states, as the whole model computes
        them."""
        logits: mx.array = (
            self._embed.as_linear(hidden) if self._tied else self._model.lm_head(hidden)
        )
        return logits

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (the embedding's rows)."""
        return int(self._embed.weight.shape[0])

    @property
    def holds_head(self) -> bool:
        """Whether `head_rows` works here: on the last stage, or on the first when the
        embeddings are tied (it holds the matrix for the lookup), and the matrix is a plain
        one (not quantized, no bias)."""
        return self._head_matrix() is not None

    def _head_matrix(self) -> mx.array | None:
        if self._tied and (self.is_first or self.is_last):
            plain = type(self._embed) is nn.Embedding
            return self._embed.weight if plain else None
        if self.is_last and not self._tied:
            head = self._model.lm_head
            plain = type(head) is nn.Linear and "bias" not in head
            return head.weight if plain else None
        return None

    def head_rows(self, hidden: mx.array, rows: range) -> mx.array:
        """Logits of vocabulary rows `rows` for final (normed) hidden states `(B, L, hidden)`.

        Bit for bit those columns of the whole head's logits: each logit is the same dot
        product whatever block of rows it is computed with. So two stages can each compute
        part of the head, at the same time.
        """
        matrix = self._head_matrix()
        if matrix is None:
            raise ValueError(f"stage {self.layers} does not hold a plain LM head matrix")
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= matrix.shape[0]:
            raise ValueError(f"head rows {rows} are not a part of 0..{matrix.shape[0]}")
        logits: mx.array = hidden @ matrix[rows.start : rows.stop].T
        return logits


def load_stage(model_dir: str | Path, layers: range) -> tuple[PipelineStage, Any]:
    """Load only the weights of `layers` from an mlx-lm directory; returns (stage, tokenizer).

    The model is loaded lazily with `mlx_lm.load` and only this stage's weights are
    evaluated, so a node holds in memory just its share of the model.
    """
    loaded = mlx_lm.load(str(model_dir), lazy=True)
    model, tokenizer = loaded[0], loaded[1]
    stage = PipelineStage(model, layers)
    mx.eval(stage.parameters())
    return stage, tokenizer


def load_stage_layers(model_dir: str | Path, layers: range) -> PipelineStage:
    """Load only the weights of `layers` (no tokenizer): what a node does when a failover
    moves layers to it. It reads them from its own copy of the model files."""
    model, _ = mlx_lm.utils.load_model(Path(model_dir), lazy=True)
    stage = PipelineStage(model, layers)
    mx.eval(stage.parameters())
    return stage


def restage(current: PipelineStage, model_dir: str | Path, layers: range) -> PipelineStage:
    """A stage for `layers` that keeps the weights `current` already holds and reads only the
    others from `model_dir`: what a node does when a failover moves layers to it.

    A fresh lazy model gets `current`'s modules for the layers both serve (and its embedding,
    norm and head, evaluated or not), so they are not read again; the weights of layers it no
    longer serves are freed with `current`.
    """
    model, _ = mlx_lm.utils.load_model(Path(model_dir), lazy=True)
    old = current._model
    for i in set(layers) & set(current.layers):
        model.model.layers[i] = old.model.layers[i]
    model.model.embed_tokens = old.model.embed_tokens
    model.model.norm = old.model.norm
    if hasattr(old, "lm_head") and hasattr(model, "lm_head"):
        model.lm_head = old.lm_head
    stage = PipelineStage(model, layers)
    mx.eval(stage.parameters())
    return stage


def stages_for(model: nn.Module, splits: Iterable[range]) -> list[PipelineStage]:
    """One `PipelineStage` per range of `splits`, over the same loaded model."""
    stages = [PipelineStage(model, layers) for layers in splits]
    if not stages or not stages[0].is_first or not stages[-1].is_last:
        raise ValueError("the stages must start at layer 0 and end at the last layer")
    for before, after in itertools.pairwise(stages):
        if before.layers.stop != after.layers.start:
            raise ValueError(f"stages {before.layers} and {after.layers} are not contiguous")
    return stages
