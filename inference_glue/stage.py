"""One pipeline stage: a contiguous range of an mlx-lm model's layers, computed by the model's
own code.

Nothing of an architecture's forward pass is re-implemented here. The stage calls the model's
own `__call__` on a view of it whose `model.embed_tokens` and `model.layers` are ports:

- the layers before the stage pass their input through untouched; the stage's first layer
  takes the previous stage's hidden state instead of what the model computed up to it (on
  the first stage: the model's own embedding, scaled as the model scales it);
- each layer of the stage runs as the model calls it, with the mask the model made for it,
  and starts computing at once (`mx.async_eval`);
- after the stage's last layer a stage that is not the last stops the call and returns the
  hidden state; the last stage lets the model finish: final norm, head, logit scaling or
  soft-capping, whatever its code does.

The model makes its masks from the caches it is given; every layer outside the stage is given
a cache of this stage of the same kind (so the same offset and window), which makes every
mask the stage uses the one the whole model makes. So the stages chained together compute bit
for bit what the whole model computes, for each architecture whose code has this layout;
`architectures.SUPPORTED` lists those checked, and others are refused.
"""

from __future__ import annotations

import copy
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
from mlx_lm.models.cache import make_prompt_cache

from inference_glue.architectures import Architecture, architecture_for, untested_allowed

__all__ = ["PipelineStage", "load_stage", "load_stage_layers", "restage", "stages_for"]

_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.")


class _StageOutput(Exception):
    """Raised by the stage's last layer to stop the model's call there."""

    def __init__(self, hidden: mx.array) -> None:
        super().__init__()
        self.hidden = hidden


class _HeadInput(Exception):
    """Raised by the head when asked for its input instead of the logits."""

    def __init__(self, hidden: mx.array) -> None:
        super().__init__()
        self.hidden = hidden


class _Feed:
    """What the ports of one stage read during one call."""

    def __init__(self) -> None:
        self.hidden: mx.array | None = None  # the previous stage's output
        self.capture_head = False


class _Port(nn.Module):
    """A module standing in for `wrapped`; attributes it lacks are the wrapped module's."""

    def __init__(self, wrapped: nn.Module, feed: _Feed) -> None:
        super().__init__()
        self.wrapped = wrapped
        self._feed = feed

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "wrapped" in self:
            return getattr(self["wrapped"], key)
        raise AttributeError(key)


class _EmbeddingPort(_Port):
    def __init__(self, wrapped: nn.Module, feed: _Feed, first: bool) -> None:
        super().__init__(wrapped, feed)
        self._first = first

    def __call__(self, inputs: mx.array) -> mx.array:
        if self._first:
            return cast(mx.array, self.wrapped(inputs))
        hidden = self._feed.hidden
        assert hidden is not None
        # A stand-in of the embedding's shape and type (never computed): the stage's first
        # layer takes the received hidden state instead. Not `hidden` itself: some models
        # scale the embedding in place (`h *= ...`).
        return mx.zeros(hidden.shape, hidden.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        if self._feed.capture_head:
            raise _HeadInput(x)
        return cast(mx.array, self.wrapped.as_linear(x))


class _HeadPort(_Port):
    def __call__(self, x: mx.array) -> mx.array:
        if self._feed.capture_head:
            raise _HeadInput(x)
        return cast(mx.array, self.wrapped(x))


class _LayerPort(_Port):
    def __init__(self, wrapped: nn.Module, feed: _Feed, *, run: bool, inject: bool, stop: bool):
        super().__init__(wrapped, feed)
        self._run, self._inject, self._stop = run, inject, stop

    def __call__(self, h: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._run:
            return h
        if self._inject:
            h = self._feed.hidden
        out = self.wrapped(h, *args, **kwargs)
        # Start computing each layer as soon as it is built, so that building the next one
        # in Python overlaps the computation (mlx-lm's generate overlaps whole steps the same
        # way). The same kernels run in the same order: the result is identical.
        mx.async_eval(out)
        if self._stop:
            raise _StageOutput(out)
        return out


def _cache_kind(cache: Any) -> tuple[Any, ...]:
    return (type(cache), getattr(cache, "max_size", None), getattr(cache, "keep", None))


def model_type_of(model: nn.Module) -> str | None:
    """The `model_type` of a loaded mlx-lm model."""
    found = getattr(model, "model_type", None)
    if not isinstance(found, str):
        found = getattr(getattr(model, "args", None), "model_type", None)
    return found if isinstance(found, str) else None


def _check_layout(model: nn.Module) -> nn.Module:
    inner = model.get("model") if isinstance(model, nn.Module) else None
    if (
        not isinstance(inner, nn.Module)
        or not isinstance(inner.get("embed_tokens"), nn.Module)
        or not isinstance(inner.get("layers"), list)
        or not inner["layers"]
    ):
        raise TypeError(
            f"{type(model).__module__}.{type(model).__name__} does not have the layout a "
            f"stage cuts (model.embed_tokens and a list model.layers)"
        )
    return inner


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
        inner = _check_layout(model)
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
        # The head is the embedding unless the model (as loaded: sanitize may drop it) has
        # its own `lm_head`.
        self._tied = "lm_head" not in model
        self._feed = _Feed()
        self._view = self._make_view(model, inner)
        self._caches: dict[str, tuple[list[Any], list[Any]]] = {}

    def _make_view(self, model: nn.Module, inner: nn.Module) -> nn.Module:
        """A shallow copy of `model` (same weights) whose embedding, layers and head are
        this stage's ports."""
        feed, stage = self._feed, self.layers
        view_inner = copy.copy(inner)
        view_inner.embed_tokens = _EmbeddingPort(inner.embed_tokens, feed, self.is_first)
        view_inner.layers = [
            _LayerPort(
                layer,
                feed,
                run=i in stage,
                inject=i == stage.start and not self.is_first,
                stop=i == stage.stop - 1 and not self.is_last,
            )
            for i, layer in enumerate(inner.layers)
        ]
        view = copy.copy(model)
        view.model = view_inner
        if not self._tied:
            view.lm_head = _HeadPort(model.lm_head, feed)
        return view

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

    def release(self, request_id: str) -> None:
        """Drop the KV caches of `request_id` (no error if it has none)."""
        self._caches.pop(request_id, None)

    def _request_caches(self, request_id: str) -> list[Any]:
        """The cache list the model is called with: this stage's own caches at its layers;
        elsewhere one of its own caches of the same kind (the model makes masks from them),
        or, where it has none of that kind, an unused fresh one."""
        held = self._caches.get(request_id)
        if held is None:
            full = make_prompt_cache(self._model)
            own = full[self.layers.start : self.layers.stop]
            by_kind = {}
            for cache in reversed(own):
                by_kind[_cache_kind(cache)] = cache
            outside = [
                i
                for i in range(len(full))
                if i not in self.layers and _cache_kind(full[i]) in by_kind
            ]
            for i in outside:
                full[i] = by_kind[_cache_kind(full[i])]
            held = self._caches[request_id] = (own, full)
        return held[1]

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
            tokens = inputs
        else:
            if inputs.ndim != 3 or not mx.issubdtype(inputs.dtype, mx.floating):
                raise ValueError(
                    f"stage {self.layers} takes a hidden state (B, L, hidden), got "
                    f"{inputs.dtype} {inputs.shape}"
                )
            tokens = mx.zeros(inputs.shape[:2], mx.int32)  # stands in for the ids; unread
        capture = self.is_last and not head
        if capture and not self.architecture.plain_head:
            raise ValueError(
                f"{self.architecture.model_type}: the LM head is not a plain matrix product; "
                f"it cannot be computed in parts"
            )
        caches = self._request_caches(request_id)
        self._feed.hidden = None if self.is_first else inputs
        self._feed.capture_head = capture
        try:
            out = self._view(tokens, cache=caches)
        except (_StageOutput, _HeadInput) as stopped:
            return stopped.hidden
        finally:
            self._feed.hidden = None
            self._feed.capture_head = False
        if not self.is_last or capture:
            raise RuntimeError(
                f"{self.architecture.model_type}: the model's code did not pass through "
                f"{'its LM head' if capture else f'layer {self.layers.stop - 1}'} as expected"
            )
        return cast(mx.array, out)

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
