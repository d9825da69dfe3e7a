"""Whether a model's KV caches can be taken over in a hand-off (`inference_glue.kv_handoff`).

A hand-off cuts every parked cache back to the positions all stages had computed: a stage
may have run one step more than the client saw come back. mlx-lm caches say whether they can
be cut back now (`is_trimmable()`), but for some kinds the answer changes as a request
grows: a sliding-window cache (`RotatingKVCache`, e.g. gemma3's local layers) can be cut
back only until its window fills, a recurrent state (`ArraysCache`) never. A model with any
such cache would offer a hand-off that fails once the answer is longer than its window; so
the client asks here, before it plans one, and such models resume with a full replay.
"""

from __future__ import annotations

import logging
from typing import Any

from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes

__all__ = ["cache_cuts_back", "caches_cut_back", "model_caches_cut_back"]

log = logging.getLogger("p2pr.inference")


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


def caches_cut_back(config: dict[str, Any]) -> bool:
    """`model_caches_cut_back` for the model of `config` (its config.json): the architecture
    is built with lazily initialised weights that are never evaluated (no weight is read or
    allocated). False when mlx-lm cannot build it: no hand-off is planned for a model whose
    caches are not known."""
    try:
        model_class, args_class = _get_classes(config)
        return model_caches_cut_back(model_class(args_class.from_dict(config)))
    except Exception as exc:  # an architecture mlx-lm does not know: no hand-off
        log.info(
            "KV caches of model type %r not known (%s): no hand-off", config.get("model_type"), exc
        )
        return False
