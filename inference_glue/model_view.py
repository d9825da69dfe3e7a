"""A view of an mlx-lm model that runs a contiguous range of its layers with the model's own
code (one pipeline stage's compute).

Nothing of an architecture's forward pass is re-implemented here. `LayerRangeView` calls the
model's own `__call__` on a shallow copy of it whose `model.embed_tokens` and `model.layers`
(and `lm_head`) are ports:

- the layers before the range pass their input through untouched; the range's first layer
  takes the previous stage's hidden state instead of what the model computed up to it (on
  the first stage: the model's own embedding, scaled as the model scales it);
- each layer of the range runs as the model calls it, with the mask the model made for it,
  and starts computing at once (`mx.async_eval`);
- after the range's last layer a view that is not the last stops the call and returns the
  hidden state; the last stage lets the model finish: final norm, head, logit scaling or
  soft-capping, whatever its code does (or stops at the head's input, for a split head).

The model makes its masks from the caches it is given; every layer outside the range is given
a cache of the range of the same kind (so the same offset and window), which makes every mask
the range uses the one the whole model makes. So views chained together compute bit for bit
what the whole model computes, for each architecture whose code has this layout;
`architectures.SUPPORTED` lists those checked.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

__all__ = ["LayerRangeView", "check_layout", "model_type_of"]


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


def check_layout(model: nn.Module) -> nn.Module:
    """The inner model (`model.model`) if it has an embedding and a list of layers."""
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


class LayerRangeView:
    """Layers `layers` of `model`, computed by the model's own `__call__`.

    Args:
        model: a loaded mlx-lm model (`check_layout`).
        layers: a non-empty range of its layers.
    """

    def __init__(self, model: nn.Module, layers: range) -> None:
        inner = check_layout(model)
        self.model = model
        self.layers = layers
        self.is_first = layers.start == 0
        self.is_last = layers.stop == len(inner.layers)
        # The head is the embedding unless the model (as loaded: sanitize may drop it) has
        # its own `lm_head`.
        self.tied = "lm_head" not in model
        self._feed = _Feed()
        view_inner = copy.copy(inner)
        view_inner.embed_tokens = _EmbeddingPort(inner.embed_tokens, self._feed, self.is_first)
        view_inner.layers = [
            _LayerPort(
                layer,
                self._feed,
                run=i in layers,
                inject=i == layers.start and not self.is_first,
                stop=i == layers.stop - 1 and not self.is_last,
            )
            for i, layer in enumerate(inner.layers)
        ]
        self._view = copy.copy(model)
        self._view.model = view_inner
        if not self.tied:
            self._view.lm_head = _HeadPort(model.lm_head, self._feed)

    def make_caches(self, given: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
        """(the range's own caches, the list the model is called with): the own caches at
        the range's layers (`given`, one per layer, or new ones); elsewhere one of its own
        caches of the same kind (the model makes masks from them), or where it has none of
        that kind an unused fresh one."""
        full = make_prompt_cache(self.model)
        if given is not None:
            if len(given) != len(self.layers):
                raise ValueError(f"{len(given)} caches for {len(self.layers)} layers")
            full[self.layers.start : self.layers.stop] = given
        own = full[self.layers.start : self.layers.stop]
        by_kind = {}
        for cache in reversed(own):
            by_kind[_cache_kind(cache)] = cache
        for i, cache in enumerate(full):
            if i not in self.layers and _cache_kind(cache) in by_kind:
                full[i] = by_kind[_cache_kind(cache)]
        return own, full

    def __call__(self, inputs: mx.array, caches: list[Any], *, head: bool = True) -> mx.array:
        """Token ids `(B, L)` (first stage) or the previous stage's hidden state `(B, L, H)`
        through the range: the hidden state after it, or on the last stage the logits (with
        `head` False, the head's input)."""
        if self.is_first:
            tokens = inputs
        else:
            tokens = mx.zeros(inputs.shape[:2], mx.int32)  # stands in for the ids; unread
            self._feed.hidden = inputs
        capture = self.is_last and not head
        self._feed.capture_head = capture
        try:
            out = self._view(tokens, cache=caches)
        except (_StageOutput, _HeadInput) as stopped:
            return stopped.hidden
        finally:
            self._feed.hidden = None
            self._feed.capture_head = False
        if not self.is_last or capture:
            where = "its LM head" if capture else f"layer {self.layers.stop - 1}"
            raise RuntimeError(
                f"{model_type_of(self.model)}: the model's code did not pass through {where} "
                f"as a stage needs"
            )
        return cast(mx.array, out)
