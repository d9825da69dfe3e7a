"""The hand-off of a lost stage's layers (`handoff_plan`, `kv_parking`, `kv_handoff`): the
plan, the bounds of what a node keeps, and in one process over memory routers (real mlx-lm
layers of the tiny model) a lost last stage taken over by its neighbour, and the fall back
to a full replay when a node cannot take over (its send log given up past its bound); a
model with sliding-window caches (gemma3), never offered a hand-off, replayed in full with its
LM head split between the first and last stages.
Every generation is compared with mlx-lm's own single-process generation.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache
from test_inprocess_pipeline import PROMPT, TOKENS, client_over, collect, pipeline, reference

from inference_glue.failover import NodeOffer
from inference_glue.footprint import ModelFootprint
from inference_glue.handoff_plan import hand_off_plan
from inference_glue.kv_kinds import cache_cuts_back
from inference_glue.kv_parking import KvParking, SentHidden
from inference_glue.plan import StageInfo
from inference_glue.stage import load_stage
from inference_glue.tiny_architectures import WINDOW, build_architecture

SPLITS = [range(0, 3), range(3, 6), range(6, 8)]


def stage_infos(splits: list[range], kv_handoff: bool = True) -> list[StageInfo]:
    return [
        StageInfo(i, f"n{i}", r, 8, "tiny", "f", "openblas", "1", 0, kv_handoff)
        for i, r in enumerate(splits)
    ]


@pytest.fixture(scope="module")
def model_dir(tiny_8_layers: Path) -> Path:
    return tiny_8_layers


def test_the_lost_layers_go_to_one_neighbour(model_dir: Path) -> None:
    footprint = ModelFootprint.from_dir(model_dir)
    stages = stage_infos(SPLITS)
    big = [NodeOffer(f"n{i}", 1 << 40) for i in range(3)]
    assert hand_off_plan(stages, "n1", big, footprint) == [("n0", range(0, 6)), ("n2", range(6, 8))]
    assert hand_off_plan(stages, "n0", big, footprint) == [("n1", range(0, 6)), ("n2", range(6, 8))]
    assert hand_off_plan(stages, "n2", big, footprint) == [("n0", range(0, 3)), ("n1", range(3, 8))]
    # Not possible: a stranger lost, a survivor not offered, a neighbour without the memory.
    assert hand_off_plan(stages, "x", big, footprint) is None
    assert hand_off_plan(stages, "n1", big[1:], footprint) is None
    small = [NodeOffer("n0", footprint.stage_bytes(range(0, 3))), *big[1:]]
    assert hand_off_plan(stages, "n1", small, footprint) is None
    assert hand_off_plan(stages[:1], "n0", big, footprint) is None


def test_parking_keeps_few_requests_and_bounded_logs() -> None:
    parking = KvParking(max_parked=2, log_bytes=10, total_log_bytes=15)
    for rid in ("a", "b", "c"):
        parking.record(rid, SentHidden(0, False, b"12345"))
        parking.park(rid, {0: object()}, "me")
    assert "a" not in parking and "b" in parking and "c" in parking  # the oldest went
    assert parking.logged_bytes == 10
    parking.record("d", SentHidden(0, False, b"123456"))  # past the total: given up
    assert parking.overflows == 1 and parking.logged_bytes == 10
    assert parking.take("b", "someone else") is None and "b" in parking  # not theirs
    parked = parking.take("b", "me")
    assert parked is not None and parking.logged_bytes == 5 and "b" not in parking
    parking.continue_log("b~1", parked.log, before=1)
    parking.record("b~1", SentHidden(1, True, b"12345"))
    parking.record("b~1", SentHidden(2, True, b"1"))  # past the request's own bound
    parking.park("b~1", {0: object()}, "me")
    again = parking.take("b~1", "me")
    assert again is not None and again.log.overflowed and not again.log.entries
    parking.discard("c")
    assert "c" not in parking and parking.logged_bytes == 0
    # None kept (caches no hand-off can take over): nothing logged, nothing parked.
    off = KvParking(max_parked=0)
    off.record("e", SentHidden(0, False, b"12345"))
    off.park("e", {0: object()}, "me")
    assert "e" not in off and off.logged_bytes == 0 and off.take("e", "me") is None


async def test_a_lost_last_stage_is_taken_over_by_its_neighbour(model_dir: Path) -> None:
    expected = reference(model_dir)
    async with pipeline(model_dir, SPLITS) as (nodes, ids):
        async with client_over(nodes, ids) as client:

            def kill_last(seq: int) -> None:
                if seq == 10:
                    nodes.kill(ids[2])

            assert await collect(client, kill_last) == expected
            [recovery] = client.recoveries
            assert recovery.handoff and recovery.layers == ((0, 3), (3, 8))
            heir, other = nodes.nodes[ids[1]].counters, nodes.nodes[ids[0]].counters
            assert heir.handoffs == other.handoffs == 1
            assert heir.rebuild_forwards > 0 and other.rebuild_forwards == 0
            assert heir.replayed_tokens == other.replayed_tokens == 0


async def test_a_node_that_cannot_take_over_gets_a_full_replay(model_dir: Path) -> None:
    expected = reference(model_dir)
    async with pipeline(model_dir, SPLITS) as (nodes, ids):
        nodes.nodes[ids[0]].parking.log_bytes = 1  # every log it keeps is given up
        async with client_over(nodes, ids) as client:

            def kill_middle(seq: int) -> None:
                if seq == 10:
                    nodes.kill(ids[1])

            assert await collect(client, kill_middle) == expected
            lost, rebuild = client.recoveries
            assert lost.handoff and not rebuild.handoff and "replaying in full" in rebuild.reason
            assert nodes.nodes[ids[0]].counters.replayed_tokens == rebuild.resumed_from


def test_no_hand_off_is_planned_for_caches_that_cannot_be_cut_back(tmp_path: Path) -> None:
    # Trimmable now is not enough: a sliding window cannot be cut back once it is full.
    assert cache_cuts_back(KVCache())
    assert RotatingKVCache(WINDOW).is_trimmable() and not cache_cuts_back(RotatingKVCache(WINDOW))
    assert not cache_cuts_back(ArraysCache(2))
    assert not cache_cuts_back(CacheList(KVCache(), RotatingKVCache(WINDOW)))
    # What a node says of its model (`InfoReply.kv_handoff`).
    gemma, _ = load_stage(build_architecture(tmp_path / "g", "gemma3_text tied"), range(0, 2))
    llama, _ = load_stage(build_architecture(tmp_path / "l", "llama"), range(0, 2))
    assert llama.caches_cut_back and not gemma.caches_cut_back
    footprint = ModelFootprint.from_dir(tmp_path / "l")
    splits = [range(0, 2), range(2, 4), range(4, 6)]
    big = [NodeOffer(f"n{i}", 1 << 40) for i in range(3)]
    assert hand_off_plan(stage_infos(splits), "n1", big, footprint) == [
        ("n0", range(0, 4)),
        ("n2", range(4, 6)),
    ]
    some = [*stage_infos(splits[:2]), *stage_infos(splits, kv_handoff=False)[2:]]
    assert hand_off_plan(some, "n1", big, footprint) is None


async def test_sliding_windows_and_a_split_head_resume_with_a_full_replay(tmp_path: Path) -> None:
    """The caches of gemma3's local layers cannot be cut back: the lost stage's layers are
    planned evenly and the request replayed, in batches of decode steps whose last one's LM
    head is split between the first and last stages (the share must name that step's
    position, or the last stage never gets its part)."""
    model_dir = build_architecture(tmp_path / "gemma3", "gemma3_text tied", seed=3)
    assert ModelFootprint.from_dir(model_dir).head_split > 0
    expected = reference(model_dir)
    at = 10
    assert len(PROMPT) + at > WINDOW and at + 1 < TOKENS  # the windows are full, steps > 1
    splits = [range(0, 2), range(2, 4), range(4, 6)]
    fixed = {i: {"adaptive_head_split": False} for i in range(3)}  # split every token's head
    async with pipeline(model_dir, splits, fixed) as (nodes, ids):
        async with client_over(nodes, ids) as client:

            def kill_middle(seq: int) -> None:
                if seq == at:
                    nodes.kill(ids[1])

            # Bounded (a stall is a failure, not a wait): well inside the client's own
            # idle timeout, which a stalled attempt would otherwise run into.
            with anyio.fail_after(60):
                assert await collect(client, kill_middle) == expected
            [recovery] = client.recoveries
            assert recovery.lost == (ids[1],) and not recovery.handoff
            first, last = nodes.nodes[ids[0]].counters, nodes.nodes[ids[2]].counters
            assert first.handoffs == last.handoffs == 0
            assert first.replayed_tokens == recovery.resumed_from > at
            assert first.head_parts > 0 and last.replay_batches > 0
            # Nothing a hand-off could use is kept: no caches parked, no hidden states logged.
            for node in (nodes.nodes[ids[0]], nodes.nodes[ids[2]]):
                assert recovery.request_id not in node.parking
                assert node.parking.logged_bytes == 0
