"""The pure parts of failover: layer sizes and placement under memory budgets, resumed token
streams, quarantine counting, and the new pipeline messages."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from inference_glue.builtin_model import builtin_model_path
from inference_glue.client import load_tokenizer
from inference_glue.failover import CorruptionTracker, NodeOffer, attempt_id, plan_stages
from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint, parse_bytes
from inference_glue.messages import (
    Failure,
    GenerateRequest,
    InfoReply,
    MessageDecodeError,
    Reconfigure,
    RequestMeta,
    decode_message,
    encode_message,
)
from inference_glue.stage import load_stage_layers, restage
from inference_glue.tokens import TokenStreamAssembler, TokenStreamWriter


@pytest.fixture(scope="module")
def tiny_dir(tiny_models: Callable[..., Path]) -> Path:
    return tiny_models(5, num_layers=6)


def test_footprint_matches_the_loaded_weights(tiny_dir: Path) -> None:
    footprint = ModelFootprint.from_dir(tiny_dir)
    model, _ = mlx_lm.load(str(tiny_dir))
    weights = dict(tree_flatten(model.parameters()))
    assert footprint.total == sum(w.nbytes for w in weights.values())
    assert footprint.layers[2] == sum(w.nbytes for k, w in weights.items() if ".layers.2." in k)
    # A stage's bytes are exactly what load_stage_layers evaluates.
    for layers in (range(0, 2), range(2, 5), range(5, 6)):
        stage = load_stage_layers(tiny_dir, layers)
        assert footprint.stage_bytes(layers) == sum(p.nbytes for p in stage.parameters())
    mx.clear_cache()


def test_placement_respects_budgets_and_says_when_nothing_fits(tiny_dir: Path) -> None:
    footprint = ModelFootprint.from_dir(tiny_dir)
    total = footprint.total
    # Plenty of memory: in proportion to the budgets.
    assert footprint.place([total, total, total]) == [range(0, 2), range(2, 4), range(4, 6)]
    assert footprint.place([2 * total, total]) == [range(0, 4), range(4, 6)]
    # A small first node: the proportional split overfills it, so it takes what fits.
    small = footprint.stage_bytes(range(0, 1))
    ranges = footprint.place([small, total])
    assert ranges == [range(0, 1), range(1, 6)]
    assert all(footprint.stage_bytes(r) <= b for r, b in zip(ranges, [small, total]))
    # One node left with room for everything: the whole model.
    assert plan_stages(footprint, [NodeOffer("a", total)]) == [("a", range(0, 6))]
    with pytest.raises(ModelDoesNotFitError, match="no node can hold the model"):
        footprint.place([total - 1])
    with pytest.raises(ModelDoesNotFitError):
        footprint.place([])
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1.5k") == 1536
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.mark.parametrize("model", ["builtin", "tiny"])
def test_a_resumed_writer_continues_the_stream_exactly(model: str, tiny_dir: Path) -> None:
    path = builtin_model_path() if model == "builtin" else tiny_dir
    tokenizer = load_tokenizer(path)
    rng = random.Random(7)
    # Multi-byte characters split over several tokens, spaces, and random ids.
    base = tokenizer.encode("héllo wörld 😀 日本語  spaces 🎉🎉 end")
    vocab = len(tokenizer._tokenizer)
    for _ in range(10):
        ids = base + [rng.randrange(vocab) for _ in range(8)]
        rng.shuffle(ids)
        writer = TokenStreamWriter("r", tokenizer)
        whole = [writer.chunk(t) for t in ids[:-1]] + [writer.chunk(ids[-1], "length")]
        for k in range(1, len(ids)):
            resumed = TokenStreamWriter("r", tokenizer, resume=ids[:k])
            rest = [resumed.chunk(t) for t in ids[k:-1]] + [resumed.chunk(ids[-1], "length")]
            assert [(c.seq, c.text) for c in rest] == [(c.seq, c.text) for c in whole[k:]]


def test_assembler_rekey_keeps_the_prefix_and_refuses_the_old_attempt() -> None:
    tokenizer = load_tokenizer(builtin_model_path())
    ids = tokenizer.encode("one two three four five")
    old = TokenStreamWriter("req", tokenizer)
    chunks = [old.chunk(t) for t in ids]
    assembler = TokenStreamAssembler("req")
    for chunk in chunks[:2] + chunks[3:4]:  # seq 3 waits for the missing seq 2
        assembler.add(chunk)
    assert assembler.rekey(attempt_id("req", 1)) == 2
    assert assembler.add(chunks[2]) == [] and assembler.stats.foreign == 1
    new = TokenStreamWriter(attempt_id("req", 1), tokenizer, resume=ids[:2])
    rest = [new.chunk(t) for t in ids[2:-1]] + [new.chunk(ids[-1], "length")]
    for chunk in rest:
        assembler.add(chunk)
    assert assembler.complete
    assert [c.seq for c in assembler.chunks] == list(range(len(ids)))
    assert assembler.text_so_far() == "".join(c.text for c in chunks[:-1]) + rest[-1].text


def test_corruption_tracker_counts_runs_per_peer() -> None:
    tracker = CorruptionTracker(3)
    assert not tracker.corrupt("a") and not tracker.corrupt("a")
    tracker.progress(["a"])  # a good token in between: the run starts again
    assert not tracker.corrupt("a") and not tracker.corrupt("b") and not tracker.corrupt("a")
    assert tracker.corrupt("a") and tracker.quarantined == {"a"}
    assert not tracker.corrupt("a")  # quarantined once


def test_failover_messages_round_trip_and_are_checked() -> None:
    meta = RequestMeta("r~1", 8, 0.0, 1.0, None, 16, ("a", "b"), "c", "direct", 3, (5, 6))
    request = decode_message(encode_message(GenerateRequest(meta, (1, 2, 3))))
    assert isinstance(request, GenerateRequest) and request.meta == meta
    for message in (
        Reconfigure(1, 2, 0, 2, 0, 4),
        Failure("r", 1, "p", "bad", "corrupt", "q"),
        InfoReply(1, "n", 0, 1, 0, 6, 6, "m", "f", "openblas", "1", 9, 2, 100, "oops", 0.5),
    ):
        assert decode_message(encode_message(message)) == message
    # An unknown failure kind, or resuming past max_tokens, is refused.
    bad = encode_message(Failure("r", 1, "p", "x")).replace(b"error", b"huh??")
    with pytest.raises(MessageDecodeError):
        decode_message(bad)
    with pytest.raises(ValueError):
        RequestMeta("r", 2, 0.0, 1.0, None, 16, ("a",), "c", resume=(1, 2))


def test_restage_keeps_held_layers_and_loads_the_rest(tiny_dir: Path) -> None:
    first = load_stage_layers(tiny_dir, range(0, 2))
    kept = first._blocks[1]
    grown = restage(first, tiny_dir, range(0, 4))
    assert grown._blocks[1] is kept  # not read again
    fresh = load_stage_layers(tiny_dir, range(0, 4))
    for a, b in zip(grown.parameters(), fresh.parameters(), strict=True):
        assert mx.array_equal(a, b).item()
    moved = restage(grown, tiny_dir, range(3, 6))  # a middle stage becomes the last
    assert moved.is_last and moved._blocks[0] is grown._blocks[3]
    last = load_stage_layers(tiny_dir, range(3, 6))
    for a, b in zip(moved.parameters(), last.parameters(), strict=True):
        assert mx.array_equal(a, b).item()
