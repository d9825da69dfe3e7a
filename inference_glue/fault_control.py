"""Fault injection across a pipeline, for chaos runs: every stage node (started with
`--allow-fault-control`) and the client itself get the same fault shim settings, and each
node the peers it is cut from (a partition)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

from inference_glue.messages import Message, SetFaults
from inference_glue.plan import PipelineError, StageInfo
from inference_glue.rpc import RequestReply
from router import FaultConfig

__all__ = ["set_pipeline_faults"]


async def set_pipeline_faults(
    rpc: RequestReply,
    stages: Sequence[StageInfo],
    faults: str,
    partitions: Mapping[str, Sequence[str]],
    timeout: float = 10.0,
) -> None:
    """Give every stage node and the asker (`rpc.router`) the shim settings `faults`
    ("" for none); `partitions` maps a node to the peers it is cut from (both ways need both
    entries). Raises `PipelineError` if a node refuses or does not answer."""
    config = FaultConfig.parse(faults)
    asks: dict[str, Callable[[int], Message]] = {
        s.node_id: functools.partial(_set_faults, faults=faults, cut=partitions.get(s.node_id, ()))
        for s in stages
    }
    replies = await rpc.ask(asks, timeout)
    refused = {
        p: ("no answer" if r is None else r.error)
        for p, r in replies.items()
        if r is None or r.error
    }
    if refused:
        raise PipelineError(f"fault settings refused: {refused}")
    rpc.router.set_faults(config, partitions.get(rpc.router.node_id, ()))


def _set_faults(nonce: int, *, faults: str, cut: Sequence[str]) -> SetFaults:
    return SetFaults(nonce, faults, tuple(cut))
