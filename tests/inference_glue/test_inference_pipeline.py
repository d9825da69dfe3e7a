"""Pipelined generation over PipelineStages equals mlx-lm's single-process generation, bit for bit.

All with the tiny random llama model; the built-in model has its own test module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest

from inference_glue.local_pipeline import (
    Generation,
    LocalPipeline,
    generate_pipelined,
    generate_single,
    prefill_pieces,
    prompt_token_ids,
)
from inference_glue.sampling import PositionalSampler, SamplingParams, sample, sampling_key
from inference_glue.stage import PipelineStage, load_stage, stages_for
from inference_glue.tiny_model import build_tiny_model
from inference_glue.tokens import TokenStreamAssembler

PROMPT = "The capital of France is"
SPLITS = {
    "2 stages": [range(0, 3), range(3, 6)],
    "3 stages": [range(0, 1), range(1, 5), range(5, 6)],
}
MODES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "seeded": {"seed": 1234, "temp": 0.9},
    "seeded top-p": {"seed": 99, "temp": 1.2, "top_p": 0.8},
}


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Any]:
    model, tokenizer = mlx_lm.load(str(tiny_dir))[:2]
    return model, tokenizer


def wire_view(generation: Generation) -> list[tuple[int, int, str, str | None]]:
    """The chunks without their request id (the two runs use different ids)."""
    return [(c.seq, c.token_id, c.text, c.finish_reason) for c in generation.chunks]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", SPLITS)
def test_pipelined_equals_single_process(tiny: tuple[Any, Any], split: str, mode: str) -> None:
    reference = generate_single(tiny, PROMPT, 24, **MODES[mode])
    pipelined = generate_pipelined(tiny, PROMPT, SPLITS[split], 24, **MODES[mode])
    assert len(reference.token_ids) == 24
    assert pipelined.token_ids == reference.token_ids
    assert wire_view(pipelined) == wire_view(reference)
    assert pipelined.finish_reason == "length"
    # The receiver side accepts the stream, text checked against tokenizer.decode.
    assembler = TokenStreamAssembler("pipelined", tokenizer=tiny[1], source="stage 2")
    for chunk in reversed(pipelined.chunks):
        assembler.add(chunk)
    assert assembler.finish() == reference.text


def test_chunked_prefill_matches_when_both_sides_chunk_alike(tiny: tuple[Any, Any]) -> None:
    prompt = "Each node runs a contiguous range of layers. " * 4
    assert [len(p) for p in prefill_pieces(6, 4)] == [4, 1, 1]
    reference = generate_single(tiny, prompt, 8, prefill_step_size=5, seed=3, temp=1.0)
    pipelined = generate_pipelined(
        tiny, prompt, SPLITS["3 stages"], 8, prefill_step_size=5, seed=3, temp=1.0
    )
    assert len(reference.prompt_ids) > 20
    assert pipelined.token_ids == reference.token_ids


def test_model_directory_and_tied_embeddings(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tied", seed=5, tie_word_embeddings=True)
    reference = generate_single(model_dir, PROMPT, 12)
    pipelined = generate_pipelined(model_dir, PROMPT, [range(0, 2), range(2, 6)], 12)
    assert pipelined.token_ids == reference.token_ids


def test_seeded_sampling_replays_and_depends_only_on_seed_and_position(
    tiny: tuple[Any, Any],
) -> None:
    first = generate_pipelined(tiny, PROMPT, SPLITS["2 stages"], 16, seed=7, temp=1.0)
    # MLX's global random state is irrelevant to the sampled tokens.
    mx.random.seed(12345)
    mx.random.normal((100,))
    again = generate_pipelined(tiny, PROMPT, SPLITS["3 stages"], 16, seed=7, temp=1.0)
    other = generate_pipelined(tiny, PROMPT, SPLITS["2 stages"], 16, seed=8, temp=1.0)
    assert again.token_ids == first.token_ids
    assert other.token_ids != first.token_ids
    assert mx.array_equal(sampling_key(7, 10), sampling_key(7, 10)).item()
    assert not mx.array_equal(sampling_key(7, 10), sampling_key(7, 11)).item()
    assert not mx.array_equal(sampling_key(7, 10), sampling_key(10, 7)).item()


def test_positional_sampler_counts_positions_from_the_prompt_length() -> None:
    params = SamplingParams(temp=1.0, seed=3)
    logprobs = mx.log(mx.ones((1, 50)) / 50)
    sampler = PositionalSampler(params, start_position=5)
    drawn = [sampler(logprobs).item() for _ in range(4)]
    assert drawn == [sample(logprobs, params, p).item() for p in range(5, 9)]
    with pytest.raises(ValueError, match="needs a seed"):
        SamplingParams(temp=0.5)


def test_several_requests_in_flight_interleaved(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    requests = {
        "a": ("The capital of France is", SamplingParams()),
        "b": ("Once upon a time", SamplingParams(temp=1.0, seed=11)),
        "c": ("def forward(self, x):", SamplingParams(temp=0.7, seed=12, top_p=0.9)),
    }
    pipeline = LocalPipeline(stages_for(model, SPLITS["3 stages"]), tokenizer)
    streams = {
        rid: pipeline.generate(rid, prompt_token_ids(tokenizer, prompt), 10, params)
        for rid, (prompt, params) in requests.items()
    }
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    # Round robin: one token of each request in turn.
    while streams:
        for rid in list(streams):
            chunk = next(streams[rid], None)
            if chunk is None:
                del streams[rid]
            else:
                assert chunk.request_id == rid
                got[rid].append(chunk.token_id)
    for rid, (prompt, params) in requests.items():
        alone = generate_single(
            tiny, prompt, 10, seed=params.seed, temp=params.temp, top_p=params.top_p
        )
        assert tuple(got[rid]) == alone.token_ids, rid
    # Every request released its caches when its stream ended.
    assert all(stage.request_ids == [] for stage in pipeline.stages)
    assert pipeline.bytes_sent > 0


def test_stage_runtime_caches_and_checks(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    first, last = PipelineStage(model, range(0, 4)), PipelineStage(model, range(4, 6))
    assert first.is_first and not first.is_last and last.is_last and not last.is_first
    hidden = first.forward("r", mx.array([5, 6, 7]))
    assert hidden.shape == (1, 3, 128) and hidden.dtype == mx.float32
    logits = last.forward("r", hidden)
    assert logits.shape == (1, 3, model.args.vocab_size)
    # The split model computes exactly the whole model.
    whole = model(mx.array([[5, 6, 7]]))
    assert mx.array_equal(logits, whole).item()
    assert first.offset("r") == 3 and last.offset("r") == 3
    first.release("r")
    assert first.offset("r") == 0 and first.request_ids == []
    first.release("never-seen")
    with pytest.raises(ValueError, match="token ids"):
        first.forward("r", mx.zeros((1, 2, 128)))
    with pytest.raises(ValueError, match="hidden state"):
        last.forward("r", mx.array([1, 2]))
    with pytest.raises(ValueError, match="not a non-empty part"):
        PipelineStage(model, range(3, 9))
    with pytest.raises(ValueError, match="not contiguous"):
        stages_for(model, [range(0, 2), range(3, 6)])


@pytest.mark.parametrize("tied", [True, False])
def test_head_rows_in_parts_equal_the_whole_head(tmp_path: Path, tied: bool) -> None:
    """The first and last stages each compute part of the LM head; joined, the parts are
    the whole head's logits bit for bit (one token and a prefill piece, several splits)."""
    model_dir = build_tiny_model(tmp_path / "m", seed=7, tie_word_embeddings=tied)
    model = mlx_lm.load(str(model_dir))[0]
    first, last = PipelineStage(model, range(0, 2)), PipelineStage(model, range(2, 6))
    vocab = model.args.vocab_size
    assert last.vocab_size == vocab and last.holds_head
    # Only tied embeddings put the head's matrix on the first stage.
    assert first.holds_head is tied
    for tokens in ([5], [5, 6, 7, 8, 9]):
        rid = f"r{len(tokens)}"
        hidden = first.forward(rid, mx.array(tokens))
        whole = last.forward(rid, hidden)
        last.release(rid)
        normed = last.forward(rid, hidden, head=False)
        assert normed.shape == (1, len(tokens), 128)
        other = first if tied else last
        for split in (1, vocab // 2, round(vocab * 0.6), vocab - 1):
            parts = mx.concatenate(
                [
                    last.head_rows(normed, range(0, split)),
                    other.head_rows(normed, range(split, vocab)),
                ],
                axis=-1,
            )
            assert mx.array_equal(parts, whole).item(), (tokens, split)
        last.release(rid)
    with pytest.raises(ValueError, match="not a part"):
        last.head_rows(normed, range(0, vocab + 1))
    if not tied:
        with pytest.raises(ValueError, match="does not hold a plain LM head"):
            first.head_rows(normed, range(0, 10))
    middle = PipelineStage(model, range(2, 4))
    assert not middle.holds_head


def test_load_stage_loads_its_part_and_still_matches(tiny_dir: Path) -> None:
    (head, tokenizer), (tail, _) = (
        load_stage(tiny_dir, range(0, 2)),
        load_stage(tiny_dir, range(2, 6)),
    )
    assert len(head.parameters()) == 1 + 2 * 9  # embedding + 2 blocks of 9 tensors
    assert len(tail.parameters()) == 4 * 9 + 2  # 4 blocks, final norm, untied head
    pipeline = LocalPipeline([head, tail], tokenizer)
    ids = prompt_token_ids(tokenizer, PROMPT)
    chunks = list(pipeline.generate("r", ids, 12, SamplingParams(temp=0.8, seed=5)))
    reference = generate_single(tiny_dir, PROMPT, 12, seed=5, temp=0.8)
    assert tuple(c.token_id for c in chunks) == reference.token_ids
