"""Tiny seeded models of every supported architecture, in every format, for tests.

`VARIANTS` holds one small config per case the tests check (`architectures.SUPPORTED` names
the model types; some have more than one case, e.g. gemma3_text with and without its own
head); `build_architecture(path, variant, fmt)` writes it as an mlx-lm directory with the tiny
model's tokenizer. Sizes are picked so that every quantized format applies to every matrix
(the inner dimensions are multiples of 64) and so that the sliding windows (8 tokens) are
exceeded by a test's prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from inference_glue.tiny_model import save_seeded_model, write_tokenizer

__all__ = ["FORMATS", "UNSUPPORTED", "VARIANTS", "TinyVariant", "build_architecture", "cases"]

# Format name -> (floating dtype, quantization (bits, group size) or None).
FORMATS: dict[str, tuple[mx.Dtype, tuple[int, int] | None]] = {
    "f32": (mx.float32, None),
    "bf16": (mx.bfloat16, None),
    "f16": (mx.float16, None),
    "q4g64": (mx.float32, (4, 64)),
    "q4g32": (mx.float32, (4, 32)),
    "q8g64": (mx.float32, (8, 64)),
    "q8g32": (mx.float32, (8, 32)),
}

WINDOW = 8

_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


@attrs.frozen
class TinyVariant:
    """One tiny model to check: its `model_type`, config beyond `_BASE`, and weight-name
    prefixes left out of the file."""

    name: str
    model_type: str
    config: dict[str, Any] = attrs.field(factory=dict)
    drop: tuple[str, ...] = ()


_GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16}
_QWEN3 = {"head_dim": 16}

VARIANTS: dict[str, TinyVariant] = {
    v.name: v
    for v in (
        TinyVariant("llama", "llama"),
        TinyVariant(
            "llama sliding window",
            "llama",
            {
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
                "sliding_window": WINDOW,
                "tie_word_embeddings": True,
            },
        ),
        TinyVariant("mistral", "mistral", {"tie_word_embeddings": True}),
        TinyVariant("qwen2", "qwen2", {"tie_word_embeddings": True}),
        TinyVariant("qwen3 tied", "qwen3", {**_QWEN3, "tie_word_embeddings": True}),
        TinyVariant("qwen3 untied", "qwen3", _QWEN3),
        TinyVariant(
            "qwen3_moe",
            "qwen3_moe",
            {
                **_QWEN3,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "decoder_sparse_step": 2,  # every other layer is an MoE layer
                "mlp_only_layers": [],
                "moe_intermediate_size": 64,
                "norm_topk_prob": True,
            },
        ),
        TinyVariant("mixtral", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        TinyVariant("phi3", "phi3"),
        TinyVariant("olmo2", "olmo2", {"tie_word_embeddings": True}),
        TinyVariant("starcoder2", "starcoder2", {"norm_epsilon": 1e-5}),
        TinyVariant("gemma", "gemma", _GEMMA),
        TinyVariant("gemma2", "gemma2", _GEMMA),
        TinyVariant(
            "gemma3_text tied",
            "gemma3_text",
            {**_GEMMA, "sliding_window": WINDOW, "sliding_window_pattern": 3},
            drop=("lm_head.",),
        ),
        TinyVariant(
            "gemma3_text untied",
            "gemma3_text",
            {**_GEMMA, "sliding_window": WINDOW, "sliding_window_pattern": 3},
        ),
        TinyVariant(
            "granite",
            "granite",
            {
                "logits_scaling": 4.0,
                "attention_multiplier": 0.25,
                "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22,
                "attention_bias": False,
                "mlp_bias": False,
            },
        ),
        TinyVariant(
            "minicpm", "minicpm", {"dim_model_base": 32, "scale_depth": 1.4, "scale_emb": 12.0}
        ),
        TinyVariant(
            "cohere",
            "cohere",
            {"layer_norm_eps": 1e-5, "logit_scale": 0.0625, "use_qk_norm": True},
        ),
        TinyVariant(
            "qwen2_moe",
            "qwen2_moe",
            {
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "shared_expert_intermediate_size": 128,
            },
        ),
        TinyVariant(
            "cohere2",
            "cohere2",
            {
                "head_dim": 16,
                "layer_norm_eps": 1e-5,
                "logit_scale": 0.0625,
                "sliding_window": WINDOW,
                "sliding_window_pattern": 3,
            },
        ),
        TinyVariant(
            "olmo3",
            "olmo3",
            {
                "sliding_window": WINDOW,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            },
        ),
        TinyVariant(
            "smollm3", "smollm3", {"no_rope_layer_interval": 3, "tie_word_embeddings": True}
        ),
    )
}


# Not supported: mlx-lm runs it, a stage refuses it (granite's code with experts).
UNSUPPORTED = TinyVariant(
    "granitemoe",
    "granitemoe",
    {
        "logits_scaling": 4.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_bias": False,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
)


def build_architecture(
    path: str | Path, variant: str | TinyVariant, fmt: str = "f32", seed: int = 0
) -> Path:
    """Write the tiny model `variant` in format `fmt` (see `FORMATS`) as an mlx-lm directory."""
    spec = VARIANTS[variant] if isinstance(variant, str) else variant
    dtype, quantize = FORMATS[fmt]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(path, vocab_size=512)
    config = {
        **_BASE,
        "model_type": spec.model_type,
        **spec.config,
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_token_id": tokenizer.token_to_id("<|im_start|>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "torch_dtype": {mx.float32: "float32", mx.bfloat16: "bfloat16"}.get(dtype, "float16"),
    }
    save_seeded_model(path, config, seed, dtype=dtype, quantize=quantize, drop=spec.drop)
    return path


def cases() -> list[tuple[str, str]]:
    """(variant, format) pairs the tests check: every variant in float32, and each other
    format an architecture lists (`architectures.SUPPORTED`) on its first variant."""
    from inference_glue.architectures import SUPPORTED

    pairs = [(name, "f32") for name in VARIANTS]
    for arch in SUPPORTED.values():
        first = next(v.name for v in VARIANTS.values() if v.model_type == arch.model_type)
        pairs += [(first, fmt) for fmt in arch.formats if fmt != "f32"]
    return pairs
