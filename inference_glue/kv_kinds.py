"""Whether a model's KV caches can be taken over in a hand-off (`inference_glue.kv_handoff`).

A hand-off cuts every parked cache back to the positions all stages had computed: a stage
may have run one step more than the client saw come back. mlx-lm caches say whether they can
be cut back now (`is_trimmable()`), but for some kinds the answer changes as a request
grows: a sliding-window cache (`RotatingKVCache`, e.g. gemma3's local layers) can be cut
back only until its window fills, a recurrent state (`ArraysCache`) never. A model with any
such cache would be offered a hand-off that fails once the answer outgrows its window; so
each stage node says whether its caches can be taken over (`InfoReply.kv_handoff`), and the
client plans a hand-off only when all of them can: other models resume with a full replay.

Asked of the loaded model on the node (`make_prompt_cache` makes no arrays): the client
builds no model of its own.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import make_prompt_cache

__all__ = ["cache_cuts_back", "model_caches_cut_back"]


def cache_cuts_back(cache: Any) -> bool:
    """Whether `cache` can be cut back at any length it may reach: trimmable now, and with no
    window that would make it untrimmable later (a list of caches: all of them)."""
    inner = getattr(cache, "caches", None)
    if isinstance(inner, list | tuple):
        return all(cache_cuts_back(c) for c in inner)
    return bool(cache.is_trimmable()) and getattr(cache, "max_size", None) is None


def model_caches_cut_back(model: Any) -> bool:
    """Whether every KV cache mlx-lm makes for `model` can be cut back (`cache_cuts_back`)."""
    return all(cache_cuts_back(c) for c in make_prompt_cache(model))
