"""The OpenAI-compatible HTTP API as a Starlette app over a `GenerationBackend`.

    app = create_app(backend, ApiSettings(host="0.0.0.0", api_key="..."))

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as Server-Sent
Events with `stream: true`), `GET /v1/models`, `GET /health`. Requests are checked in full
before anything is generated (schemas.py, generation.plan_generation); a client that
disconnects cancels its request upstream, streamed or not.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import attrs
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import BearerAuth, check_bind
from .backend import GenerationBackend, PromptError
from .errors import ApiError, bad_request, exception_handlers
from .generation import Finished, GenerationPlan, TextDelta, plan_generation, run_generation
from .payloads import ResponseIdentity, chat_completion, completion, model_list, usage
from .schemas import ChatCompletionRequest, CompletionRequest, check_model, parse_request
from .streaming import ClosingEventSourceResponse, chat_events, completion_events

__all__ = ["ApiSettings", "create_app"]

T = TypeVar("T")


@attrs.frozen
class ApiSettings:
    """How the API serves.

    Attributes:
        host: the address the API is bound to; off loopback an `api_key` is required.
        api_key: the bearer key every `/v1/` request must carry (None: no check).
        default_max_tokens: a completion's length when the request gives none (capped by
            what is left of the context).
        default_temperature: when the request gives none (0: greedy, as mlx_lm.server).
        max_body_bytes: the largest request body accepted (413 above).
        max_in_flight: requests generating at once; more get 429.
        ping_seconds: SSE keep-alive comment interval (proxies close silent streams).
    """

    host: str = "127.0.0.1"
    api_key: str | None = None
    default_max_tokens: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    default_temperature: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    max_body_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=attrs.validators.ge(1))
    max_in_flight: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    ping_seconds: float = attrs.field(default=15.0, validator=attrs.validators.gt(0.0))


def create_app(backend: GenerationBackend, settings: ApiSettings | None = None) -> Starlette:
    """The API over `backend`. Raises `InsecureBindError` for a non-loopback `host`
    without an `api_key`."""
    settings = settings or ApiSettings()
    check_bind(settings.host, settings.api_key)
    api = _Api(backend, settings)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    middleware = []
    if settings.api_key is not None:
        middleware.append(Middleware(BearerAuth, api_key=settings.api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=exception_handlers())
    app.state.api = api
    return app


class _Api:
    """The endpoints' state: the backend, the settings, the requests in flight."""

    def __init__(self, backend: GenerationBackend, settings: ApiSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.created = int(time.time())
        self.in_flight = 0
        # Tokenizers are not safe to call from several threads at once.
        self._tokenizer_lock = anyio.CapacityLimiter(1)

    # -- endpoints -------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": self.backend.model_id,
                "in_flight": self.in_flight,
                "backend": dict(self.backend.health()),
            }
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse(model_list(self.backend.model_id, self.created))

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        check_model(model_id, self.backend.model_id)
        return JSONResponse(model_list(model_id, self.created)["data"][0])

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        chat = parse_request(body, ChatCompletionRequest)
        check_model(chat.model, self.backend.model_id)
        messages = [m.for_template() for m in chat.messages]
        prompt_ids = await self._encode(self.backend.encode_chat, messages, "messages")
        plan = self._plan(chat, chat.token_limit, prompt_ids, "messages")
        ident = ResponseIdentity.new("chatcmpl", self.backend.model_id)
        if chat.stream:
            return self._stream(plan, ident, chat.include_usage, chat_events)
        text, finish = await self._collect(request, plan)
        counts = usage(len(plan.prompt_ids), finish.completion_tokens)
        return JSONResponse(chat_completion(ident, text, finish.reason, counts))

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        call = parse_request(body, CompletionRequest)
        check_model(call.model, self.backend.model_id)
        prompt_ids = await self._encode(self.backend.encode_prompt, call.prompt, "prompt")
        plan = self._plan(call, call.token_limit, prompt_ids, "prompt")
        ident = ResponseIdentity.new("cmpl", self.backend.model_id)
        if call.stream:
            return self._stream(plan, ident, call.include_usage, completion_events)
        text, finish = await self._collect(request, plan)
        counts = usage(len(plan.prompt_ids), finish.completion_tokens)
        return JSONResponse(completion(ident, text, finish.reason, counts))

    # -- steps -----------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) beyond `max_body_bytes` without reading it all."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes")
        if not body:
            raise bad_request("the request has no body: a JSON object is expected")
        return bytes(body)

    async def _encode(self, encode: Callable[[T], list[int]], prompt: T, param: str) -> list[int]:
        try:
            return await anyio.to_thread.run_sync(encode, prompt, limiter=self._tokenizer_lock)
        except PromptError as exc:
            raise bad_request(str(exc), param=param) from None

    def _plan(
        self, request: Any, token_limit: int | None, prompt_ids: Sequence[int], param: str
    ) -> GenerationPlan:
        plan = plan_generation(
            request,
            token_limit,
            prompt_ids,
            self.backend.max_context,
            default_max_tokens=self.settings.default_max_tokens,
            default_temperature=self.settings.default_temperature,
            prompt_param=param,
        )
        if self.in_flight >= self.settings.max_in_flight:
            raise ApiError(
                429, f"{self.in_flight} requests are in flight already; try again shortly"
            )
        return plan

    def _stream(
        self,
        plan: GenerationPlan,
        ident: ResponseIdentity,
        include_usage: bool,
        events: Callable[..., Any],
    ) -> Response:
        self.in_flight += 1
        sse = events(run_generation(self.backend, plan), ident, len(plan.prompt_ids), include_usage)
        return ClosingEventSourceResponse(sse, self._finished, ping=self.settings.ping_seconds)

    def _finished(self) -> None:
        self.in_flight -= 1

    async def _collect(self, request: Request, plan: GenerationPlan) -> tuple[str, Finished]:
        """The whole text and the finish; the generation is cancelled if the client goes."""
        self.in_flight += 1
        try:
            return await _unless_disconnected(request, lambda: _gather(self.backend, plan))
        finally:
            self.in_flight -= 1


async def _gather(backend: GenerationBackend, plan: GenerationPlan) -> tuple[str, Finished]:
    pieces: list[str] = []
    async with aclosing(run_generation(backend, plan)) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                return "".join(pieces), event
    raise ApiError(500, "the generation ended without a finish")


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """`work()`, cancelled if the client disconnects first (its body is read already, so
    the next ASGI message can only be the disconnect). After a disconnect the answer is an
    error nobody reads."""
    result: list[T] = []
    error: list[BaseException] = []

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        try:
            result.append(await work())
        except Exception as exc:  # re-raised outside the task group, unwrapped
            error.append(exc)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    if not result:
        raise ApiError(400, "the client disconnected before the completion was ready")
    return result[0]
