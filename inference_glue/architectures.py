"""The mlx-lm architectures a pipeline stage runs, each checked bit for bit, and the refusal of
all the others.

A stage runs the model's own mlx-lm code (see `stage`), so what an architecture does outside
its layers (embedding scales, logit scaling or soft-capping, its own masks) is done as mlx-lm
does it. What remains architecture-specific is whether that code has the layout the stage
cuts (`model.embed_tokens`, `model.layers`, the rest on the last stage) and whether the LM
head is a plain matrix product (the split head needs that): both are only trusted for the
architectures below, each of which tests/inference_glue/test_architectures.py runs on 2 and 3 stages against
single-process mlx-lm in every format listed. Anything else is refused when it is loaded,
unless `P2PR_ALLOW_UNTESTED_ARCHITECTURE=1` (`--allow-untested-architecture`), and then
`p2pr generate` checks its output against single-process mlx-lm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "SUPPORTED",
    "Architecture",
    "UnsupportedArchitectureError",
    "architecture_for",
    "check_model_dir",
    "read_config",
    "supported_table",
    "untested_allowed",
]

ALLOW_UNTESTED_ENV = "P2PR_ALLOW_UNTESTED_ARCHITECTURE"

# Formats of the tests (tiny_architectures.FORMATS): float32, bfloat16, float16 weights;
# affine quantization with 4 or 8 bits per weight in groups of 32 or 64.
F32 = "f32"
NOTHING = "nothing more than embed, norm, head"


@attrs.frozen
class Architecture:
    """An mlx-lm `model_type` a stage runs.

    Args:
        model_type: config.json's `model_type`.
        outside_layers: what its code does outside the layers (for the README).
        plain_head: the logits are the final hidden state times the head matrix, nothing
            applied after, so the first stage may compute part of them (split LM head).
        formats: the formats the tests check it in (tiny_architectures.FORMATS).
        tested: False for an architecture run under `--allow-untested-architecture`.
    """

    model_type: str
    outside_layers: str
    plain_head: bool
    formats: tuple[str, ...] = (F32,)
    tested: bool = True


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one a stage has been checked to run bit for bit."""


def _arch(
    model_type: str, outside: str, plain_head: bool = True, formats: tuple[str, ...] = (F32,)
) -> Architecture:
    return Architecture(model_type, outside, plain_head, formats)


SUPPORTED: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        _arch(
            "llama",
            "sliding-window layers (`layer_types`) get their own mask",
            formats=(F32, "bf16", "f16", "q4g64", "q8g32"),
        ),
        _arch("mistral", "(llama's code)"),
        _arch("qwen2", NOTHING),
        _arch("qwen3", NOTHING, formats=(F32, "bf16", "q4g64", "q4g32")),
        _arch("qwen3_moe", NOTHING, formats=(F32, "q4g64")),
        _arch("mixtral", NOTHING, formats=(F32, "q8g64")),
        _arch("phi3", NOTHING),
        _arch("olmo2", NOTHING),
        _arch("starcoder2", NOTHING),
        _arch("gemma", "embedding × √hidden"),
        _arch("gemma2", "embedding × √hidden; logits soft-capped", plain_head=False),
        _arch(
            "gemma3_text",
            "embedding × √hidden; sliding-window layers by pattern; tied or not by the "
            "weights present",
            formats=(F32, "bf16", "q4g32"),
        ),
        _arch(
            "granite",
            "embedding × `embedding_multiplier`; logits ÷ `logits_scaling`",
            plain_head=False,
            formats=(F32, "q4g64"),
        ),
        _arch(
            "minicpm",
            "embedding × `scale_emb`; hidden ÷ (hidden/`dim_model_base`) before the head",
            plain_head=False,
        ),
        _arch("cohere", "logits × `logit_scale`", plain_head=False),
        _arch("qwen2_moe", NOTHING),
        _arch(
            "cohere2",
            "sliding-window layers by pattern; logits × `logit_scale`",
            plain_head=False,
        ),
        _arch("olmo3", "sliding-window layers (`layer_types`) get their own mask"),
        _arch("smollm3", "(llama's code; no RoPE in every n-th layer)"),
    )
}


def untested_allowed() -> bool:
    """Whether this process runs architectures outside `SUPPORTED` (its environment)."""
    return os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0")


def architecture_for(model_type: str | None, *, allow_untested: bool = False) -> Architecture:
    """The `Architecture` of `model_type`.

    Raises:
        UnsupportedArchitectureError: it is not in `SUPPORTED` and `allow_untested` is off;
            the message names it and the supported ones.
    """
    known = SUPPORTED.get(model_type or "")
    if known is not None:
        return known
    if allow_untested:
        return Architecture(str(model_type), "unknown", plain_head=False, formats=(), tested=False)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported: a pipeline stage runs only the "
        f"architectures checked to give the same tokens as single-process mlx-lm: "
        f"{', '.join(sorted(SUPPORTED))} (--allow-untested-architecture runs it anyway "
        f"and checks the output against single-process mlx-lm)"
    )


def read_config(model_dir: str | Path) -> dict[str, object]:
    """config.json of an mlx-lm directory, with one-line errors for what is missing."""
    root = Path(model_dir)
    path = root / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{root} is not an mlx-lm model directory (no config.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def check_model_dir(model_dir: str | Path, *, allow_untested: bool = False) -> Architecture:
    """What a command checks before it starts nodes: a config.json with a supported
    `model_type`, weights and tokenizer files. Raises FileNotFoundError, ValueError or
    `UnsupportedArchitectureError` with a one-line message."""
    root = Path(model_dir)
    config = read_config(root)
    model_type = config.get("model_type")
    arch = architecture_for(
        model_type if isinstance(model_type, str) else None, allow_untested=allow_untested
    )
    if not any(root.glob("*.safetensors")):
        raise FileNotFoundError(f"{root} has no .safetensors weights")
    if not any((root / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{root} has no tokenizer (tokenizer.json or tokenizer.model)")
    return arch


FORMAT_NAMES = {
    "f32": "float32",
    "bf16": "bfloat16",
    "f16": "float16",
    "q4g64": "4-bit g64",
    "q4g32": "4-bit g32",
    "q8g64": "8-bit g64",
    "q8g32": "8-bit g32",
}


def supported_table() -> str:
    """The README's table of supported architectures (tests check that the README has it)."""
    lines = [
        "| model_type | outside its layers (run by mlx-lm's own code) | "
        "split LM head (when tied, unquantized) | checked formats |",
        "| --- | --- | --- | --- |",
    ]
    for arch in SUPPORTED.values():
        formats = ", ".join(FORMAT_NAMES[f] for f in arch.formats)
        split = "yes" if arch.plain_head else "no"
        lines.append(f"| `{arch.model_type}` | {arch.outside_layers} | {split} | {formats} |")
    return "\n".join(lines)
