"""One generation as the API runs it: the request's limits checked against the model's
context, then the backend's chunks turned into text deltas (stop strings applied) and a
finish, shared by the streaming and the non-streaming responses.

The backend's stream is always closed before the finish is reported (at a stop string,
after the last chunk, on an error) and whenever the consumer stops early (it closes this
generator), so a request never outlives its HTTP exchange upstream.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

import attrs

from .backend import GenerationBackend
from .errors import ApiError
from .schemas import GenerationFields
from .stops import StopScanner

__all__ = ["Finished", "GenerationPlan", "TextDelta", "plan_generation", "run_generation"]

log = logging.getLogger("p2pr.api")


@attrs.frozen
class GenerationPlan:
    """What the backend is asked for."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temp: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]


@attrs.frozen
class TextDelta:
    """Text that may be shown."""

    text: str


@attrs.frozen
class Finished:
    """The end: OpenAI's finish reason ("stop" or "length") and the tokens generated."""

    reason: str
    completion_tokens: int


def plan_generation(
    request: GenerationFields,
    token_limit: int | None,
    prompt_ids: Sequence[int],
    max_context: int,
    *,
    default_max_tokens: int,
    default_temperature: float,
    prompt_param: str,
) -> GenerationPlan:
    """The plan for a request whose prompt is `prompt_ids`.

    Raises `ApiError` 400 `context_length_exceeded` when the prompt, or the prompt and the
    asked `token_limit` together, do not fit the model's context; without a limit, the
    completion gets `default_max_tokens` or what is left of the context."""
    prompt = len(prompt_ids)
    if prompt == 0:
        raise ApiError(400, "the prompt has no tokens", param=prompt_param)
    room = max_context - prompt
    if room < 1 or (token_limit is not None and token_limit > room):
        asked = f" and {token_limit} in the completion" if token_limit is not None else ""
        raise ApiError(
            400,
            f"This model's maximum context length is {max_context} tokens. However, you "
            f"requested {prompt + (token_limit or 0)} tokens ({prompt} in the "
            f"{prompt_param}{asked}). Please reduce the length of the {prompt_param} or "
            "the completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    temp = default_temperature if request.temperature is None else request.temperature
    seed = request.seed
    if temp > 0 and seed is None:
        # The pipeline samples deterministically from a seed; a request that gives none
        # gets a fresh one, which is what "no seed" means to an OpenAI client.
        seed = secrets.randbits(63)
    return GenerationPlan(
        prompt_ids=tuple(prompt_ids),
        max_tokens=token_limit if token_limit is not None else min(default_max_tokens, room),
        temp=temp,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=seed,
        stops=request.stop_strings,
    )


async def run_generation(
    backend: GenerationBackend, plan: GenerationPlan
) -> AsyncGenerator[TextDelta | Finished, None]:
    """Text deltas, then one `Finished`. `ApiError` 500 if the backend fails."""
    scanner = StopScanner(plan.stops)
    tokens = 0
    reason: str | None = None
    tail = ""
    try:
        chunks = backend.stream(
            plan.prompt_ids, plan.max_tokens, temp=plan.temp, top_p=plan.top_p, seed=plan.seed
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                tokens += 1
                scan = scanner.feed(chunk.text)
                if scan.stopped:
                    reason, tail = "stop", scan.text
                    break
                if chunk.finish_reason is not None:
                    reason, tail = chunk.finish_reason, scan.text + scanner.flush()
                    break
                if scan.text:
                    yield TextDelta(scan.text)
    except ApiError:
        raise
    except Exception as exc:
        log.warning("generation failed: %s: %s", type(exc).__name__, exc)
        raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc
    if reason is None:
        raise ApiError(500, f"the backend's stream ended without a finish after {tokens} tokens")
    if tail:
        yield TextDelta(tail)
    yield Finished(reason, tokens)
