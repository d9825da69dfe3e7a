"""The response bodies, as OpenAI's API writes them (`chat.completion`, `chat.completion.chunk`,
`text_completion`, `list` of `model`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import attrs

__all__ = [
    "ResponseIdentity",
    "chat_chunk",
    "chat_completion",
    "completion",
    "completion_chunk",
    "model_list",
    "usage",
    "usage_chunk",
]


@attrs.frozen
class ResponseIdentity:
    """What every chunk of one response repeats: its id, creation time and model."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseIdentity:
        """A fresh identity: `prefix` is "chatcmpl" or "cmpl", as OpenAI's."""
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def head(self, kind: str) -> dict[str, Any]:
        """The fields every body of this response starts with."""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Token counts."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_chunk(
    ident: ResponseIdentity,
    delta: dict[str, str],
    finish_reason: str | None,
    with_usage_field: bool,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; with `include_usage`, every chunk has `usage: null` but
    the last."""
    body = ident.head("chat.completion.chunk")
    body["choices"] = [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    if with_usage_field:
        body["usage"] = None
    return body


def completion_chunk(
    ident: ResponseIdentity, text: str, finish_reason: str | None, with_usage_field: bool
) -> dict[str, Any]:
    """One streamed `text_completion`."""
    body = ident.head("text_completion")
    body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(ident: ResponseIdentity, kind: str, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: no choices, the counts."""
    body = ident.head(kind)
    body["choices"] = []
    body["usage"] = counts
    return body


def chat_completion(
    ident: ResponseIdentity, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """A whole `chat.completion`."""
    body = ident.head("chat.completion")
    body["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    ]
    body["usage"] = counts
    return body


def completion(
    ident: ResponseIdentity, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """A whole `text_completion`."""
    body = ident.head("text_completion")
    body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    body["usage"] = counts
    return body


def model_list(model_id: str, created: int) -> dict[str, Any]:
    """`GET /v1/models`: the one model served."""
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "p2pr"}],
    }
