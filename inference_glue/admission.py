"""Whether a stage node takes a new request (the checks that need no state of the request),
and the kind of `Failure` it reports when it cannot serve one."""

from __future__ import annotations

from inference_glue.kv_handoff import HandoffError
from inference_glue.link_watch import LinkLostError
from inference_glue.messages import GenerateRequest
from inference_glue.tensor_codec import TensorDecodeError

__all__ = ["StaleEpochError", "check_request", "failure_of"]


class StaleEpochError(ValueError):
    """A request for a plan epoch other than the node's."""


def check_request(
    request: GenerateRequest,
    epoch: int,
    index: int,
    num_stages: int,
    node_id: str,
    vocab_size: int | None,
) -> None:
    """Raise (`StaleEpochError` or `ValueError`, with why) unless stage `index` of
    `num_stages`, node `node_id` at plan `epoch`, should serve `request`."""
    meta = request.meta
    rid = meta.request_id
    if meta.epoch != epoch:
        raise StaleEpochError(
            f"request {rid!r} is for plan epoch {meta.epoch}; this node is at {epoch}"
        )
    if len(meta.route) != num_stages or meta.route[index] != node_id:
        raise ValueError(
            f"the route {list(meta.route)} does not have this node as stage {index} of {num_stages}"
        )
    if vocab_size is not None:
        bad = [t for t in request.prompt_ids + meta.resume if not 0 <= t < vocab_size]
        if bad:
            # MLX's embedding lookup would not fail: it would read outside the table.
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside the vocabulary (0-{vocab_size - 1})"
            )


def failure_of(exc: Exception, peer: str) -> tuple[str, str, str]:
    """The `Failure` kind, message and suspect for `exc`, raised on a message from `peer`:
    the client resumes a "rebuild" with a full replay, counts a "corrupt" against `peer`,
    and checks the suspect of a "lost" (the peer of a broken link) before it resumes."""
    if isinstance(exc, HandoffError):
        return "rebuild", f"cannot take over the KV caches: {exc}", ""
    if isinstance(exc, TensorDecodeError):
        return "corrupt", f"hidden state from {peer} failed its check: {exc}", peer
    if isinstance(exc, StaleEpochError):
        return "stale", str(exc), ""
    if isinstance(exc, LinkLostError):
        return "lost", str(exc), exc.peer
    return "error", f"{type(exc).__name__}: {exc}", ""
