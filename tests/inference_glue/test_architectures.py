"""Every supported architecture, split into 2 and 3 stages, computes what single-process
mlx-lm computes, bit for bit; anything else is refused.

Tiny seeded models of each case of `tiny_architectures` (each supported `model_type`, some in
more than one variant, and the formats `architectures.SUPPORTED` lists) run in one process:
the chained stages' logits against the whole model's, and generation, greedy and seeded,
against mlx-lm's `stream_generate`. Then what a stage holds: only its own weights (the others
are poisoned with NaN), exactly the bytes the footprint reads from the files, the split LM
head where the architecture's head allows it. Multi-process runs are in
test_architectures_cluster.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from inference_glue.architectures import (
    SUPPORTED,
    UnsupportedArchitectureError,
    check_model_dir,
    supported_table,
)
from inference_glue.footprint import ModelFootprint
from inference_glue.local_pipeline import generate_pipelined, generate_single, prompt_token_ids
from inference_glue.stage import PipelineStage, load_stage, load_stage_layers, stages_for
from inference_glue.tiny_architectures import (
    FORMATS,
    UNSUPPORTED,
    VARIANTS,
    WINDOW,
    build_architecture,
    cases,
)

PROMPT = "The capital of France is a city of many rivers and mountains"
SPLITS = {
    "2 stages": [range(0, 3), range(3, 6)],
    # A one-layer middle stage; with a sliding pattern of 3 the stages hold only sliding
    # layers, only a global one, and both.
    "3 stages": [range(0, 2), range(2, 3), range(3, 6)],
}
TOKENS = 20
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Tiny model directories, built on first use."""
    return {}


def model_dir(dirs: dict[tuple[str, str], Path], factory: Any, variant: str, fmt: str) -> Path:
    if (variant, fmt) not in dirs:
        root = factory.mktemp(f"{variant}-{fmt}".replace(" ", "-"))
        dirs[variant, fmt] = build_architecture(root / "model", variant, fmt)
    return dirs[variant, fmt]


@pytest.fixture
def built(model_dirs: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return lambda variant, fmt="f32": model_dir(model_dirs, tmp_path_factory, variant, fmt)


def test_the_tested_cases_cover_every_supported_architecture_and_format() -> None:
    assert {v.model_type for v in VARIANTS.values()} == set(SUPPORTED)
    assert {(v, f) for v, f in cases()} >= {(v, "f32") for v in VARIANTS}
    for arch in SUPPORTED.values():
        assert arch.formats[0] == "f32" and set(arch.formats) <= set(FORMATS)
        tested = {f for v, f in cases() if VARIANTS[v].model_type == arch.model_type}
        assert tested == set(arch.formats), arch.model_type
    # The list, at least.
    assert set(SUPPORTED) >= {
        "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3", "olmo2",
        "starcoder2", "gemma2", "gemma3_text", "granite", "minicpm", "cohere",
    }  # fmt: skip


def test_readme_lists_exactly_the_supported_architectures() -> None:
    assert supported_table() in README.read_text(), (
        "README.md's table of supported architectures is not architectures.supported_table()"
    )


def chained_logits(stages: list[PipelineStage], ids: list[int], rid: str) -> mx.array:
    x = mx.array(ids)
    for stage in stages:
        x = stage.forward(rid, x)
    return x


@pytest.mark.parametrize(("variant", "fmt"), cases(), ids=[f"{v}-{f}" for v, f in cases()])
def test_stages_equal_single_process_mlx_lm(built: Any, variant: str, fmt: str) -> None:
    loaded = mlx_lm.load(str(built(variant, fmt)))[:2]
    model, tokenizer = loaded
    ids = prompt_token_ids(tokenizer, PROMPT)
    assert len(ids) > WINDOW  # the sliding windows are exceeded from the prompt on
    cache = make_prompt_cache(model)
    whole = model(mx.array([ids]), cache=cache)
    step = model(mx.array([[ids[-1]]]), cache=cache)
    greedy = generate_single(loaded, PROMPT, TOKENS)
    seeded = generate_single(loaded, PROMPT, TOKENS, seed=7, temp=1.0)
    assert len(greedy.token_ids) >= 8 and len(seeded.token_ids) >= 8  # (or an end token)
    for name, splits in SPLITS.items():
        stages = stages_for(model, splits)
        assert mx.array_equal(chained_logits(stages, ids, "r"), whole).item(), name
        assert mx.array_equal(chained_logits(stages, [ids[-1]], "r"), step).item(), name
        got = generate_pipelined(loaded, PROMPT, splits, TOKENS)
        assert got.token_ids == greedy.token_ids, (name, "greedy")
        assert got.text == greedy.text
        got = generate_pipelined(loaded, PROMPT, splits, TOKENS, seed=7, temp=1.0)
        assert got.token_ids == seeded.token_ids, (name, "seeded")
    # A chunked prefill crosses the sliding windows with several tokens at a time.
    chunked = generate_single(loaded, PROMPT, 8, seed=3, temp=0.9, prefill_step_size=5)
    got = generate_pipelined(
        loaded, PROMPT, SPLITS["3 stages"], 8, seed=3, temp=0.9, prefill_step_size=5
    )
    assert got.token_ids == chunked.token_ids


def poisoned(model_path: Path, keep: set[str]) -> Any:
    """The model with every floating weight outside `keep` replaced by NaN."""
    model = mlx_lm.load(str(model_path))[0]
    nan = [
        (name, mx.full(array.shape, math.nan, array.dtype))
        for name, array in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
        if name not in keep and mx.issubdtype(array.dtype, mx.floating)
    ]
    model.update(tree_unflatten(nan))
    return model


@pytest.mark.parametrize(
    ("variant", "fmt"),
    [(v, "f32") for v in VARIANTS]
    + [("llama", f) for f in ("bf16", "f16", "q8g32")]
    + [("gemma3_text tied", "q4g32"), ("qwen3_moe", "q4g64"), ("mixtral", "q8g64")],
)
def test_a_stage_uses_its_own_weights_and_the_footprint_counts_them(
    built: Any, variant: str, fmt: str
) -> None:
    path = built(variant, fmt)
    model, tokenizer = mlx_lm.load(str(path))[:2]
    ids = mx.array(prompt_token_ids(tokenizer, PROMPT))
    footprint = ModelFootprint.from_dir(path)
    x = ids
    for layers in SPLITS["3 stages"]:
        clean = PipelineStage(model, layers)
        out = clean.forward("r", x)
        names = {name for name, _ in clean.named_parameters()}
        alone = PipelineStage(poisoned(path, names), layers)
        assert mx.array_equal(alone.forward("r", x), out).item(), layers
        # What a node loads for these layers is what the footprint says it needs.
        loaded = load_stage_layers(path, layers)
        assert footprint.stage_bytes(layers) == sum(p.nbytes for p in loaded.parameters())
        x = out
    assert footprint.quantized is fmt.startswith("q")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_head_only_where_the_head_is_a_plain_product(built: Any, variant: str) -> None:
    path = built(variant)
    model, tokenizer = mlx_lm.load(str(path))[:2]
    arch = SUPPORTED[VARIANTS[variant].model_type]
    first, last = stages_for(model, SPLITS["2 stages"])
    tied = "lm_head" not in model
    footprint = ModelFootprint.from_dir(path)
    assert footprint.tied is tied
    assert (footprint.head_split > 0) is (tied and arch.plain_head)
    ids = mx.array(prompt_token_ids(tokenizer, PROMPT))
    hidden = first.forward("r", ids)
    whole = last.forward("r", hidden)
    last.release("r")
    if not arch.plain_head:
        assert not first.holds_head and not last.holds_head
        with pytest.raises(ValueError, match="not a plain matrix product"):
            last.forward("r", hidden, head=False)
        return
    head_input = last.forward("r", hidden, head=False)
    assert mx.array_equal(last.head(head_input), whole).item()
    assert first.holds_head is tied and last.holds_head
    vocab = last.vocab_size
    other = first if tied else last
    for cut in (1, round(vocab * 0.6), vocab - 1):
        parts = mx.concatenate(
            [
                last.head_rows(head_input, range(0, cut)),
                other.head_rows(head_input, range(cut, vocab)),
            ],
            axis=-1,
        )
        assert mx.array_equal(parts, whole).item(), cut


def test_an_unsupported_architecture_is_refused_clearly(tmp_path: Path) -> None:
    path = build_architecture(tmp_path / "moe", UNSUPPORTED)
    message = r"model_type 'granitemoe' is not supported.*: cohere, cohere2, gemma, .*, starcoder2 .*untested"
    with pytest.raises(UnsupportedArchitectureError, match=message):
        check_model_dir(path)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        load_stage(path, range(0, 3))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        load_stage_layers(path, range(3, 6))
    # mlx-lm itself runs it; with the escape hatch a stage does too, marked untested, with
    # no split head (nothing is known about its head).
    assert check_model_dir(path, allow_untested=True).tested is False
    loaded = mlx_lm.load(str(path))[:2]
    stages = stages_for(loaded[0], SPLITS["2 stages"], allow_untested=True)
    assert not stages[0].architecture.tested and not stages[0].architecture.plain_head
    assert len(generate_single(loaded, PROMPT, 4).token_ids) == 4


def test_model_dir_checks_say_what_is_missing(tmp_path: Path, built: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors weights"):
        check_model_dir(tmp_path)
    good = built("qwen2")
    (tmp_path / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        check_model_dir(tmp_path)
    assert check_model_dir(good).model_type == "qwen2"
