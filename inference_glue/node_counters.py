"""What a stage node did, besides what its router counts (`StatsReply.work`)."""

from __future__ import annotations

import attrs

__all__ = ["NodeCounters"]


@attrs.define
class NodeCounters:
    """What a stage node did, besides what the router counts."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    abandoned: int = 0
    forwards: int = 0
    tokens_sampled: int = 0
    chunks_published: int = 0
    compute_seconds: float = 0.0
    # First stage: from sending a hidden state to be sampled to receiving its token back.
    round_trips: int = 0
    round_trip_seconds: float = 0.0
    bytes_out: int = 0
    tensor_checksum_failures: int = 0
    bad_messages: int = 0
    stale_messages: int = 0
    # The same hidden state or token delivered twice (the router promises exactly once).
    duplicate_deliveries: int = 0
    replayed_tokens: int = 0
    # Messages of replayed decode steps this stage ran (`inference_glue.replay`), each a
    # batch of up to REPLAY_BATCH steps: what a replay costs in messages at this stage.
    replay_batches: int = 0
    # Resumed requests that took over their previous attempt's KV caches (`kv_handoff`), and
    # the forwards run here to rebuild the caches of the layers this stage gained.
    handoffs: int = 0
    rebuild_forwards: int = 0
    reconfigurations: int = 0
    # Fault injection (--corrupt-activations): hidden states damaged after their checksum.
    activations_corrupted: int = 0
    # First stage, split LM head: parts of the logits computed for the last stage, and the
    # time that took (also in compute_seconds).
    head_parts: int = 0
    head_seconds: float = 0.0
