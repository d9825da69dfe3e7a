"""The plan after a lost stage that keeps every other stage's KV caches: the survivors keep
their layers and the lost stage's layers go to one neighbour, the stage before it (or, for
the first stage, the one after it), which can rebuild their caches locally
(`inference_glue.kv_handoff`): from its log of the hidden states it sent the lost stage, or
from the tokens for the model's first layers.

The layers are then less even than `failover.plan_stages` would place them, which costs
memory on the neighbour, not time (a request's steps go through every layer in turn
anyway); the client falls back to the even plan when the neighbour's budget is too small,
and plans none for a model whose caches cannot be cut back (sliding windows, recurrent
state: `inference_glue.kv_kinds`; every stage says so in its `InfoReply.kv_handoff`), which
resumes with a full replay.
Between requests the plan is left as it is: it changes only when the nodes do.
"""

from __future__ import annotations

from collections.abc import Sequence

from inference_glue.failover import NodeOffer
from inference_glue.footprint import ModelFootprint
from inference_glue.plan import StageInfo

__all__ = ["hand_off_plan"]


def hand_off_plan(
    stages: Sequence[StageInfo],
    lost: str,
    offers: Sequence[NodeOffer],
    footprint: ModelFootprint,
) -> list[tuple[str, range]] | None:
    """(node id, layers) per stage: `stages` without `lost`, its layers given to a neighbour;
    None when that is not possible (a stage's KV caches cannot be taken over, e.g. sliding
    windows: `StageInfo.kv_handoff`; `lost` is not a stage, or is the only one; a survivor
    is not offered; the neighbour's memory budget is too small)."""
    if not all(s.kv_handoff for s in stages):
        return None
    index = next((s.index for s in stages if s.node_id == lost), None)
    if index is None or len(stages) < 2:
        return None
    budgets = {o.node_id: o.memory_budget for o in offers}
    plan = [(s.node_id, s.layers) for s in stages if s.node_id != lost]
    if any(node not in budgets for node, _ in plan):
        return None
    dead = stages[index].layers
    heir = 0 if index == 0 else index - 1
    node, layers = plan[heir]
    plan[heir] = (node, range(min(layers.start, dead.start), max(layers.stop, dead.stop)))
    if footprint.stage_bytes(plan[heir][1]) > budgets[node]:
        return None
    return plan
