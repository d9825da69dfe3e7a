"""Streamed responses: Server-Sent Events (sse-starlette) of `chat.completion.chunk` or
`text_completion` bodies, ending in `data: [DONE]`.

An error after the stream began (a failed backend) is sent as one event
`data: {"error": {...}}` in OpenAI's shape, which OpenAI's clients raise as an APIError,
and the stream ends without `[DONE]`.

`ClosingEventSourceResponse` closes the event generator, and so the backend's stream,
whenever the response ends, however it ends: sse-starlette cancels its sending task when
the client disconnects, and a generator cancelled before it ever started, or while
suspended at a `yield`, would otherwise be closed only when garbage-collected.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from .errors import ApiError
from .generation import Finished, TextDelta
from .payloads import ResponseIdentity, chat_chunk, completion_chunk, usage, usage_chunk

__all__ = ["ClosingEventSourceResponse", "chat_events", "completion_events"]

Events = AsyncGenerator[TextDelta | Finished, None]
SseEvents = AsyncGenerator[dict[str, str], None]

DONE = {"data": "[DONE]"}


def _event(body: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(body, ensure_ascii=False, separators=(",", ":"))}


async def chat_events(
    events: Events, ident: ResponseIdentity, prompt_tokens: int, include_usage: bool
) -> SseEvents:
    """`chat.completion.chunk` events: the role first, then the text, then the finish."""
    yield _event(chat_chunk(ident, {"role": "assistant", "content": ""}, None, include_usage))
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield _event(chat_chunk(ident, {"content": event.text}, None, include_usage))
                    continue
                yield _event(chat_chunk(ident, {}, event.reason, include_usage))
                if include_usage:
                    counts = usage(prompt_tokens, event.completion_tokens)
                    yield _event(usage_chunk(ident, "chat.completion.chunk", counts))
        except ApiError as error:
            yield _event(error.body())
            return
    yield DONE


async def completion_events(
    events: Events, ident: ResponseIdentity, prompt_tokens: int, include_usage: bool
) -> SseEvents:
    """Streamed `text_completion` events: the text, then the finish."""
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield _event(completion_chunk(ident, event.text, None, include_usage))
                    continue
                yield _event(completion_chunk(ident, "", event.reason, include_usage))
                if include_usage:
                    counts = usage(prompt_tokens, event.completion_tokens)
                    yield _event(usage_chunk(ident, "text_completion", counts))
        except ApiError as error:
            yield _event(error.body())
            return
    yield DONE


class ClosingEventSourceResponse(EventSourceResponse):
    """An SSE response that closes its generator when it ends (see the module docstring)
    and then calls `on_close` (the API's count of requests in flight)."""

    def __init__(
        self, events: SseEvents, on_close: Callable[[], None], *, ping: float = 15.0
    ) -> None:
        super().__init__(events, ping=ping, sep="\n", cleanup_timeout=10.0)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await self._events.aclose()
            finally:
                self._on_close()
