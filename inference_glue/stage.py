"""One pipeline stage: a contiguous range of an mlx-lm model's layers, with per-request KV
caches.

The stage's compute is the model's own mlx-lm code (`model_view.LayerRangeView`), so the
stages chained together compute bit for bit what the whole model computes; it is trusted for
the architectures `architectures.SUPPORTED` lists (each checked so by the tests), and any
other is refused when the stage is made. The first stage embeds token ids, the last one
applies the final norm and the LM head (and whatever the model applies after it); with a
plain head the first and the last stage can each compute part of the logits (`head_rows`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils
from mlx.utils import tree_flatten

from inference_glue.architectures import Architecture, architecture_for, untested_allowed
from inference_glue.kv_kinds import model_caches_cut_back
from inference_glue.model_view import LayerRangeView, check_layout, model_type_of

__all__ = [
    "PipelineStage",
    "check_stage",
    "load_stage",
    "load_stage_layers",
    "load_unplanned",
    "restage",
    "stages_for",
]

_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.")


class PipelineStage:
    """Layers `layers` of `model`, with per-request KV caches.

    Args:
        model: a loaded mlx-lm model of a supported architecture (`architectures`).
        layers: the layer range, e.g. `range(0, 15)`; the stage is first if it starts at
            layer 0 and last if it ends at the model's last layer.
        allow_untested: run an architecture outside `architectures.SUPPORTED` (its output
            is then unchecked).

    Raises:
        UnsupportedArchitectureError: the model's `model_type` is not supported.
    """

    def __init__(self, model: nn.Module, layers: range, *, allow_untested: bool = False) -> None:
        self.architecture: Architecture = architecture_for(
            model_type_of(model), allow_untested=allow_untested
        )
        inner = check_layout(model)
        total = len(inner.layers)
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= total:
            raise ValueError(f"layer range {layers} is not a non-empty part of 0..{total}")
        self.layers = layers
        self.num_model_layers = total
        self._view = LayerRangeView(model, layers)
        self.is_first = self._view.is_first
        self.is_last = self._view.is_last
        self._model = model
        self._blocks = inner.layers[layers.start : layers.stop]
        self._embed = inner.embed_tokens
        self._tied = self._view.tied
        # Per request: (this stage's caches, the cache list the model is called with).
        self._caches: dict[str, tuple[list[Any], list[Any]]] = {}

    def named_parameters(self) -> list[tuple[str, mx.array]]:
        """The weights this stage uses (and only those), by name: its layers; the embedding
        on the first stage; every other weight (final norm, head) on the last, which also
        holds the embedding when it is the head."""
        chosen = []
        for name, array in cast(list[tuple[str, mx.array]], tree_flatten(self._model.parameters())):
            if match := _LAYER_PARAM.match(name):
                used = int(match.group(1)) in self.layers
            elif name.startswith("model.embed_tokens."):
                used = self.is_first or (self.is_last and self._tied)
            else:
                used = self.is_last
            if used:
                chosen.append((name, array))
        return chosen

    def parameters(self) -> list[mx.array]:
        """The arrays of `named_parameters`."""
        return [array for _, array in self.named_parameters()]

    @property
    def request_ids(self) -> list[str]:
        """The requests that hold KV caches on this stage."""
        return list(self._caches)

    def offset(self, request_id: str) -> int:
        """How many tokens of `request_id` this stage has processed (0 if none)."""
        caches = self._caches.get(request_id)
        return int(caches[0][0].offset) if caches else 0

    def cache_state(self, request_id: str) -> list[mx.array]:
        """The KV cache arrays of `request_id`, to `mx.eval` after a prefill chunk."""
        own = self._caches[request_id][0] if request_id in self._caches else []
        return [array for cache in own for array in cache.state if array is not None]

    def take_caches(self, request_id: str) -> dict[int, Any]:
        """The KV caches of `request_id` by model layer, taken from this stage (it no longer
        holds them); empty if it holds none."""
        held = self._caches.pop(request_id, None)
        return dict(zip(self.layers, held[0])) if held is not None else {}

    def adopt_caches(self, request_id: str, by_layer: dict[int, Any]) -> None:
        """Hold `by_layer` (a cache for each of this stage's layers) as the KV caches of
        `request_id` (a resumed request that takes over another attempt's caches)."""
        if request_id in self._caches:
            raise ValueError(f"request {request_id!r} already holds KV caches here")
        missing = [layer for layer in self.layers if layer not in by_layer]
        if missing:
            raise ValueError(f"no KV cache for layers {missing}")
        self._caches[request_id] = self._view.make_caches([by_layer[i] for i in self.layers])

    @property
    def caches_cut_back(self) -> bool:
        """Whether every KV cache of this model can be cut back at any length (`kv_kinds`):
        only then can a resumed request take them over (`kv_handoff`)."""
        return model_caches_cut_back(self._model)

    def range_view(self, layers: range) -> LayerRangeView:
        """A view of `layers` (this stage's model, whose weights of those layers it must
        hold or read lazily): what rebuilds the KV caches of layers a stage gained."""
        return LayerRangeView(self._model, layers)

    def release(self, request_id: str) -> None:
        """Drop the KV caches of `request_id` (no error if it has none)."""
        self._caches.pop(request_id, None)

    def forward(self, request_id: str, inputs: mx.array, *, head: bool = True) -> mx.array:
        """Run this stage's layers for the next tokens of `request_id`.

        Args:
            inputs: on the first stage, token ids `(L,)` or `(B, L)`; on the others, the
                previous stage's output `(B, L, hidden)`.
            head: on the last stage, False stops at the head's input: the hidden state whose
                logits `head_rows` computes in parts (architectures with a plain head only).

        Returns:
            The hidden state `(B, L, hidden)` for the next stage, or on the last stage the
            logits `(B, L, vocab)`. Its layers are already being computed in the
            background (`mx.async_eval`); reading the result waits for them. The caches of a
            new request are made on its first call, with mlx-lm's `make_prompt_cache`.
        """
        if self.is_first:
            if inputs.ndim == 1:
                inputs = inputs[None]
            if inputs.ndim != 2 or not mx.issubdtype(inputs.dtype, mx.integer):
                raise ValueError(
                    f"the first stage takes token ids (L,) or (B, L), got {inputs.dtype} "
                    f"{inputs.shape}"
                )
        else:
            if inputs.ndim != 3 or not mx.issubdtype(inputs.dtype, mx.floating):
                raise ValueError(
                    f"stage {self.layers} takes a hidden state (B, L, hidden), got "
                    f"{inputs.dtype} {inputs.shape}"
                )
        if self.is_last and not head and not self.architecture.plain_head:
            raise ValueError(
                f"{self.architecture.model_type}: the LM head is not a plain matrix product; "
                f"it cannot be computed in parts"
            )
        held = self._caches.get(request_id)
        if held is None:
            held = self._caches[request_id] = self._view.make_caches()
        return self._view(inputs, held[1], head=head)

    def head(self, hidden: mx.array) -> mx.array:
        """The LM head of a plain-head architecture: logits for the head's input (what
        `forward(..., head=False)` returns), as the whole model computes them."""
        if not self.architecture.plain_head:
            raise ValueError(f"{self.architecture.model_type}: the LM head is not plain")
        if self._tied:
            return cast(mx.array, self._embed.as_linear(hidden))
        return cast(mx.array, self._model.lm_head(hidden))

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head."""
        head = self._embed if self._tied else self._model.lm_head
        return int(head.weight.shape[0])

    @property
    def holds_head(self) -> bool:
        """Whether `head_rows` works here: on the last stage, or on the first when the
        embeddings are tied (it holds the matrix for the lookup), the head is plain for the
        architecture, and the matrix is a plain one (not quantized, no bias)."""
        return self._head_matrix() is not None

    def _head_matrix(self) -> mx.array | None:
        if not self.architecture.plain_head:
            return None
        if self._tied and (self.is_first or self.is_last):
            plain = type(self._embed) is nn.Embedding
            return self._embed.weight if plain else None
        if self.is_last and not self._tied:
            head = self._model.lm_head
            plain = type(head) is nn.Linear and "bias" not in head
            return head.weight if plain else None
        return None

    def head_rows(self, hidden: mx.array, rows: range) -> mx.array:
        """Logits of vocabulary rows `rows` for the head's input `(B, L, hidden)`.

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
    evaluated, so a node holds in memory just its share of the model. An architecture
    outside `architectures.SUPPORTED` is refused unless the environment allows it.
    """
    loaded = mlx_lm.load(str(model_dir), lazy=True)
    model, tokenizer = loaded[0], loaded[1]
    stage = PipelineStage(model, layers, allow_untested=untested_allowed())
    mx.eval(stage.parameters())
    return stage, tokenizer


def load_unplanned(model_dir: str | Path) -> tuple[PipelineStage, Any]:
    """The model's structure over all its layers with no weight read (lazily loaded, never
    evaluated), and its tokenizer: what a node holds before its first plan gives it layers
    (`restage` then reads only those). It must not compute: the node says it is unplanned.
    """
    loaded = mlx_lm.load(str(model_dir), lazy=True)
    model, tokenizer = loaded[0], loaded[1]
    layers = range(len(check_layout(model).layers))
    return PipelineStage(model, layers, allow_untested=untested_allowed()), tokenizer


def load_stage_layers(model_dir: str | Path, layers: range) -> PipelineStage:
    """Load only the weights of `layers` (no tokenizer): what a node does when a failover
    moves layers to it. It reads them from its own copy of the model files."""
    model, _ = mlx_lm.utils.load_model(Path(model_dir), lazy=True)
    stage = PipelineStage(model, layers, allow_untested=untested_allowed())
    mx.eval(stage.parameters())
    return stage


def restage(current: PipelineStage, model_dir: str | Path, layers: range) -> PipelineStage:
    """A stage for `layers` that keeps the weights `current` already holds and reads only the
    others from `model_dir`: what a node does when a failover moves layers to it.

    A fresh lazy model gets `current`'s modules for the layers both serve and its arrays for
    everything outside the layers (evaluated or not), so they are not read again; the weights
    of layers it no longer serves are freed with `current`.
    """
    model, _ = mlx_lm.utils.load_model(Path(model_dir), lazy=True)
    old = current._model
    for i in set(layers) & set(current.layers):
        model.model.layers[i] = old.model.layers[i]
    outside = [
        (name, array)
        for name, array in cast(list[tuple[str, mx.array]], tree_flatten(old.parameters()))
        if _LAYER_PARAM.match(name) is None
    ]
    model.load_weights(outside, strict=False)
    stage = PipelineStage(model, layers, allow_untested=not current.architecture.tested)
    mx.eval(stage.parameters())
    return stage


def stages_for(
    model: nn.Module, splits: Iterable[range], *, allow_untested: bool = False
) -> list[PipelineStage]:
    """One `PipelineStage` per range of `splits`, over the same loaded model."""
    stages = [PipelineStage(model, layers, allow_untested=allow_untested) for layers in splits]
    if not stages or not stages[0].is_first or not stages[-1].is_last:
        raise ValueError("the stages must start at layer 0 and end at the last layer")
    for before, after in itertools.pairwise(stages):
        if before.layers.stop != after.layers.start:
            raise ValueError(f"stages {before.layers} and {after.layers} are not contiguous")
    return stages


def check_stage(stage: PipelineStage, index: int, num_stages: int) -> None:
    """Raise ValueError unless `stage` can be stage `index` of `num_stages`."""
    if not 0 <= index < num_stages:
        raise ValueError(f"stage {index} of {num_stages} does not exist")
    if stage.is_first != (index == 0) or stage.is_last != (index == num_stages - 1):
        raise ValueError(
            f"stage {index} of {num_stages} cannot serve layers "
            f"{stage.layers.start}-{stage.layers.stop - 1} of {stage.num_model_layers}"
        )
