"""A tiny llama-style model with seeded random weights, for tests: a few MB, built in ~1 s.

`build_tiny_model(path)` writes a standard mlx-lm directory (model.safetensors, config.json,
tokenizer.json, tokenizer_config.json) that `mlx_lm.load(path)` reads like any checkpoint.
The tokenizer is a byte-level BPE trained offline with `tokenizers` on a built-in text, so
any UTF-8 string, emoji included, encodes and decodes back exactly.

Every weight is drawn with its own key derived from `(seed, parameter name)`, so the same seed
gives bitwise-identical weights in any process, whatever MLX's global random state.
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import xxhash
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.utils import MODEL_REMAPPING, quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "TRAINING_TEXT",
    "build_tiny_model",
    "model_classes",
    "save_seeded_model",
    "train_tokenizer",
    "write_tokenizer",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Built-in training text: English prose, code, numbers, other scripts and emoji, so that the
# merges cover common words; anything else still encodes, byte by byte.
TRAINING_TEXT = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
A reliable channel delivers every message exactly once, in order, and never corrupted.
Each node runs a contiguous range of layers; hidden states travel between the stages.
The last stage samples a token and sends it back to the first stage, which embeds it.
Once upon a time there was a little model that wanted to speak many languages.
It read books about rivers and mountains, about numbers like 3.14159 and 2718281828,
about the weather (sunny, cloudy, rainy) and about the stars at night.
def forward(self, x):
    for layer in self.layers:
        x = layer(x)
    return self.norm(x)
for (int i = 0; i < 10; i++) { total += values[i]; }
Les modèles de langue prédisent le mot suivant. Ça marche très bien, déjà.
Die Straße führt über die Brücke zum Bahnhof. Grüße aus München!
El niño comió una manzana en la mañana. ¿Dónde está la biblioteca?
Быстрая коричневая лиса прыгает через ленивую собаку.
東京は日本の首都です。今日はいい天気ですね。
北京是中国的首都。我们一起学习。
서울은 한국의 수도입니다.
Emoji: 🚀 launch, 🎉 party, 👍 ok, ❤️ love, 🇫🇷 flag, 👩‍💻 coder, 😀😃😄😁.
Math: ∑ x² ≤ ∞, α + β = γ, 1/2 ≈ 0.5, 10 € or 12 $ or 9 £.
"""


def train_tokenizer(vocab_size: int = 1024, text: str = TRAINING_TEXT) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `text`; the special tokens get ids 0, 1, 2.

    The vocabulary may end up smaller than `vocab_size` when the text runs out of pairs.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # The full byte alphabet makes every UTF-8 string encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _param_key(seed: int, name: str) -> mx.array:
    return mx.random.key(xxhash.xxh3_64_intdigest(struct.pack("<Q", seed) + name.encode()))


def _init_weight(seed: int, name: str, shape: tuple[int, ...]) -> mx.array:
    key = _param_key(seed, name)
    if name.endswith("norm.weight"):
        # Not all ones, so that a norm applied in the wrong place shows in the outputs.
        return 1.0 + 0.1 * mx.random.normal(shape, key=key)
    # Variance-preserving scale for matrices (fan-in is the last axis of an MLX Linear).
    return mx.random.normal(shape, key=key) / math.sqrt(shape[-1])


def write_tokenizer(path: Path, vocab_size: int = 1024) -> Tokenizer:
    """Train the byte-level BPE tokenizer and write tokenizer.json and tokenizer_config.json
    (chat template, special tokens) into `path`."""
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
    )
    return tokenizer


def model_classes(model_type: str) -> tuple[Any, Any]:
    """mlx-lm's (Model, ModelArgs) classes for `model_type`, as `mlx_lm.load` picks them."""
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    return module.Model, module.ModelArgs


def save_seeded_model(
    path: Path,
    config: dict[str, Any],
    seed: int,
    *,
    dtype: mx.Dtype = mx.float32,
    quantize: tuple[int, int] | None = None,
    drop: Sequence[str] = (),
) -> None:
    """Build `config`'s mlx-lm model with seeded random weights and save it in `path`.

    Args:
        dtype: of the floating weights (before quantization).
        quantize: (bits, group size) of mlx-lm's affine quantization, as `mlx_lm.convert -q`.
        drop: prefixes of weights left out of the file (e.g. `lm_head.`: a model whose head
            is then its embedding, as Gemma-3 checkpoints are saved).
    """
    model_class, args_class = model_classes(str(config["model_type"]))
    model = model_class(args_class.from_dict(config))
    weights = [
        (name, _init_weight(seed, name, tuple(param.shape)).astype(dtype))
        for name, param in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    ]
    model.update(tree_unflatten(weights))
    if quantize is not None:
        bits, group_size = quantize
        model, config = quantize_model(model, config, group_size, bits)
    mx.eval(model.parameters())
    save_weights = {
        name: array
        for name, array in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
        if not name.startswith(tuple(drop))
    }
    mx.save_safetensors(str(path / "model.safetensors"), save_weights, metadata={"format": "mlx"})
    save_config(config, path / "config.json")


def build_tiny_model(
    path: str | Path,
    seed: int = 0,
    *,
    hidden_size: int = 128,
    num_layers: int = 6,
    intermediate_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1024,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a seeded random llama model and a trained tokenizer as an mlx-lm directory.

    Returns the directory, ready for `mlx_lm.load`. With the defaults the weights are
    ~4.5 MB of float32. (`tiny_architectures` builds the other architectures.)
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(path, vocab_size)
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": tokenizer.get_vocab_size(),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": tokenizer.token_to_id("<|im_start|>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "torch_dtype": "float32",
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = [
        (name, _init_weight(seed, name, tuple(param.shape)))
        for name, param in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    ]
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, path / "config.json")
    return path
