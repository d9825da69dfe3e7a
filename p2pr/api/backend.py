"""What the HTTP API needs from whatever generates tokens: `GenerationBackend`.

The API knows nothing of pipelines or nodes. A backend names its model, says how long a
context the model takes, turns a prompt or a conversation into token ids, and streams the
`TokenChunk`s of a generation. Closing that stream early (`aclose()`) must cancel the
request upstream: the API closes it when a stop string is found or the client disconnects.

`PipelineBackend` is the backend over `inference_glue.client.PipelineClient`, whose stream
releases the request on every stage (and so its KV caches) when closed before its end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from inference_glue.client import PipelineClient
    from inference_glue.tokens import TokenChunk

__all__ = [
    "GenerationBackend",
    "PipelineBackend",
    "PromptError",
    "TokenizerPrompts",
    "model_context_length",
]

# Above this a tokenizer's model_max_length is transformers' "no limit" placeholder.
_NO_LIMIT = 10**7


class PromptError(ValueError):
    """A prompt that cannot be built (no chat template, or the template refused the messages)."""


@runtime_checkable
class GenerationBackend(Protocol):
    """A model that generates tokens for the API."""

    @property
    def model_id(self) -> str:
        """The model's name in the API (`model` of requests, `GET /v1/models`)."""
        ...

    @property
    def max_context(self) -> int:
        """The most tokens (prompt and completion together) one request may have."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """The token ids of a completion prompt (as mlx-lm's `stream_generate` encodes it)."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template, ready for
        the assistant's answer. Raises `PromptError`."""
        ...

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        temp: float,
        top_p: float,
        seed: int | None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """The chunks of one generation, one per token; the last has a `finish_reason`.
        Each chunk's text is the streaming detokenizer's. `aclose()` cancels upstream."""
        ...

    def health(self) -> Mapping[str, Any]:
        """JSON-friendly facts for `GET /health` (e.g. the pipeline's stages)."""
        ...


class TokenizerPrompts:
    """`encode_prompt` and `encode_chat` over an mlx-lm tokenizer (`self.tokenizer`).

    Tokenizers are not safe to call from several threads at once; the API calls these
    from one worker thread at a time."""

    tokenizer: Any

    def encode_prompt(self, text: str) -> list[int]:
        """As `stream_generate` encodes a string: special tokens unless it starts with BOS."""
        bos = self.tokenizer.bos_token
        ids = self.tokenizer.encode(
            text, add_special_tokens=bos is None or not text.startswith(bos)
        )
        return [int(i) for i in ids]

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The chat template's rendering, tokenized, with the generation prompt."""
        if not getattr(self.tokenizer, "has_chat_template", False):
            raise PromptError(
                "this model has no chat template: use /v1/completions with a prompt string"
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            raise PromptError(f"the chat template refused the messages: {exc}") from None
        return [int(i) for i in ids]


def model_context_length(model_dir: str | Path, tokenizer: Any = None) -> int:
    """The model's context length: `max_position_embeddings` of its config.json, else the
    tokenizer's `model_max_length`, else 4096."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        value = config.get(key)
        if type(value) is int and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if type(limit) is int and 0 < limit < _NO_LIMIT:
        return limit
    return 4096


class PipelineBackend(TokenizerPrompts):
    """The API's backend over a connected `PipelineClient` (failover included)."""

    def __init__(self, client: PipelineClient, model_id: str, max_context: int) -> None:
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        self.client = client
        self.tokenizer = client.tokenizer
        self._model_id = model_id
        self._max_context = max_context

    @classmethod
    def for_model(
        cls, client: PipelineClient, model_dir: str | Path, model_id: str | None = None
    ) -> PipelineBackend:
        """The backend for the model in `model_dir` (default name: the folder's name)."""
        path = Path(model_dir)
        return cls(
            client,
            model_id or path.resolve().name,
            model_context_length(path, client.tokenizer),
        )

    @property
    def model_id(self) -> str:
        """The model's name in the API."""
        return self._model_id

    @property
    def max_context(self) -> int:
        """The most tokens one request may have."""
        return self._max_context

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        temp: float,
        top_p: float,
        seed: int | None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """`PipelineClient.stream`: closing it early releases the request on every stage."""
        return self.client.stream(prompt_ids, max_tokens, temp=temp, top_p=top_p, seed=seed)

    def health(self) -> Mapping[str, Any]:
        """The pipeline's stages, as the client sees them."""
        client = self.client
        connected = client.router.connected
        return {
            "epoch": client.epoch,
            "stages": [
                {
                    "stage": s.index,
                    "node_id": s.node_id,
                    "layers": [s.layers.start, s.layers.stop],
                    "connected": s.node_id in connected,
                }
                for s in client.stages
            ],
        }
