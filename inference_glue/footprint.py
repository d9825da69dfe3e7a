"""How much memory a model's layers take, read from the safetensors headers alone.

Placement needs to know, before anything is loaded, whether a node can hold a range of
layers: a failover that moves layers to a node without room for them must fail at once with
a clear error, not after the node runs out of memory. A safetensors file starts with a JSON
header giving every tensor's byte range, so the bytes of each layer, of the embedding, the
final norm and the LM head are known without reading any weights.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import attrs
import xxhash

from inference_glue.architectures import SUPPORTED
from inference_glue.placement import contiguous_ranges, memory_weighted_counts

__all__ = [
    "HEAD_SPLIT_LAST",
    "ModelDoesNotFitError",
    "ModelFootprint",
    "available_memory",
    "format_bytes",
    "model_fingerprint",
    "parse_bytes",
]

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# A header larger than this is not a safetensors header we wrote or mlx-lm would.
_MAX_HEADER = 100 << 20


class ModelDoesNotFitError(RuntimeError):
    """No placement of the model's layers fits in the memory the nodes offer."""


def parse_bytes(text: str) -> int:
    """'512M' -> 536870912; '2g', '1500000', '64KiB' work too."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G, 1500000)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _tensor_sizes(path: Path) -> dict[str, int]:
    with open(path, "rb") as fd:
        head = fd.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
        header = json.loads(fd.read(length))
    sizes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        sizes[name] = int(stop) - int(start)
    return sizes


# The last stage's first share of the LM head's rows when the first stage computes the rest
# (its HeadSplitTuner moves the cut from there). More than half: the first stage's part comes
# back two hops later. Fixed cuts with SmolLM2 on 2 stages here: 0.5 -> 9.85 tok/s,
# 0.58 -> 10.05, 0.66 -> 10.02.
HEAD_SPLIT_LAST = 0.6


@attrs.frozen
class ModelFootprint:
    """Bytes of weights per part of an mlx-lm model, as its files hold them (so quantized,
    bf16/f16 and mixture-of-experts layers count what they really take)."""

    layers: tuple[int, ...]
    embedding: int
    norm: int  # the final norm and any other weight outside the layers and the embedding
    lm_head: int  # 0 when the embeddings are tied (the last stage then holds the embedding)
    tied: bool
    vocab_size: int = 0
    quantized: bool = False
    plain_head: bool = True  # the logits are the head's matrix product alone (architectures)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelFootprint:
        """Read the footprint of an mlx-lm model directory (config.json, *.safetensors)."""
        root = Path(model_dir)
        config = json.loads((root / "config.json").read_text())
        num_layers = int(config["num_hidden_layers"])
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{root} has no .safetensors weights")
        layers = [0] * num_layers
        embedding = norm = lm_head = 0
        for path in files:
            for name, size in _tensor_sizes(path).items():
                if match := _LAYER.match(name):
                    index = int(match.group(1))
                    if index < num_layers:
                        layers[index] += size
                elif "embed_tokens" in name:
                    embedding += size
                elif name.startswith("lm_head"):
                    lm_head += size
                else:
                    # The final norm, and whatever else lies outside the layers: the last
                    # stage holds it (as `PipelineStage.parameters` has it).
                    norm += size
        tied = bool(config.get("tie_word_embeddings", False)) or lm_head == 0
        vocab = int(config.get("vocab_size", 0))
        quantized = "quantization" in config
        arch = SUPPORTED.get(str(config.get("model_type")))
        plain_head = arch is not None and arch.plain_head
        return cls(tuple(layers), embedding, norm, lm_head, tied, vocab, quantized, plain_head)

    @property
    def head_split(self) -> int:
        """Vocabulary rows the last stage computes when the first computes the rest of the
        LM head (`RequestMeta.head_split`): `HEAD_SPLIT_LAST` of them, when the first stage
        holds the same plain matrix (tied, unquantized embeddings) and the architecture's
        logits are that matrix product alone (no scaling or soft-capping after it); else 0,
        no split."""
        if not self.tied or self.quantized or not self.plain_head or self.vocab_size < 2:
            return 0
        return max(1, min(self.vocab_size - 1, round(self.vocab_size * HEAD_SPLIT_LAST)))

    @property
    def num_layers(self) -> int:
        """The model's number of transformer layers."""
        return len(self.layers)

    @property
    def total(self) -> int:
        """Bytes of the whole model on one node."""
        return self.stage_bytes(range(self.num_layers))

    def stage_bytes(self, layers: range) -> int:
        """Bytes a node holds to run `layers` (the first stage also embeds; the last one
        norms and projects to the vocabulary)."""
        size = sum(self.layers[i] for i in layers)
        first = layers.start == 0
        last = layers.stop == self.num_layers
        if first or (last and self.tied):
            size += self.embedding
        if last:
            size += self.norm + self.lm_head
        return size

    def place(self, budgets: Sequence[int]) -> list[range]:
        """Contiguous layer ranges, one per node in order, that fit the nodes' `budgets`
        (bytes each), as even in bytes as the budgets allow; nodes that get no layers have
        an empty range.

        Layers are dealt in proportion to the budgets first; where that overfills a node,
        each node in order takes as many layers as fit instead.

        Raises:
            ModelDoesNotFitError: no contiguous split fits; says what is needed and offered.
        """
        if not budgets:
            raise ModelDoesNotFitError("no node is left to hold the model")
        counts = memory_weighted_counts(self.num_layers, [max(b, 1) for b in budgets])
        ranges = contiguous_ranges(counts)
        if all(self.stage_bytes(r) <= b for r, b in zip(ranges, budgets) if r):
            return ranges
        greedy = self._greedy(budgets)
        if greedy is not None:
            return greedy
        offered = ", ".join(format_bytes(b) for b in budgets)
        raise ModelDoesNotFitError(
            f"no node can hold the model: its {self.num_layers} layers need "
            f"{format_bytes(self.total)} on one node (the largest layer "
            f"{format_bytes(max(self.layers, default=0))}, embedding "
            f"{format_bytes(self.embedding)}), and the {len(budgets)} node(s) left offer "
            f"{offered} ({format_bytes(sum(budgets))} in all) with no split that fits"
        )

    def _greedy(self, budgets: Sequence[int]) -> list[range] | None:
        ranges: list[range] = []
        start = 0
        for budget in budgets:
            stop = start
            while stop < self.num_layers and self.stage_bytes(range(start, stop + 1)) <= budget:
                stop += 1
            ranges.append(range(start, stop))
            start = stop
        return ranges if start == self.num_layers else None


def available_memory() -> int:
    """Bytes of memory available to a new process (Linux MemAvailable), the default memory
    budget of a node; 1 TiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as fd:
            for line in fd:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def model_fingerprint(model_dir: str | Path) -> str:
    """xxh3-64 over the model's config, tokenizer and weight files (names and bytes).

    Nodes of one pipeline must load the same model; the client compares fingerprints.
    """
    root = Path(model_dir)
    digest = xxhash.xxh3_64()
    names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    names += sorted(p.name for p in root.glob("*.safetensors"))
    for name in names:
        path = root / name
        if not path.is_file():
            continue
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as fd:
            while block := fd.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
