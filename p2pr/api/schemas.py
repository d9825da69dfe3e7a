"""The request bodies of the API as frozen attrs classes, structured from JSON by the project's
strict cattrs converter (`p2p_reliable.schema`): no `"1"` becomes 1, no unknown field is
ignored (OpenAI also refuses an unrecognized argument), and every bound is checked before
a handler sees the request. A problem becomes `ApiError` 400 naming the parameter.

Fields OpenAI defines but this server does not implement are accepted only at their neutral
value (`n: 1`, penalties 0, `logprobs: false`), so a client never silently gets less than
it asked for.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar, get_args

import attrs
import cattrs
from cattrs.errors import BaseValidationError, ForbiddenExtraKeysError

from p2p_reliable import schema

from .errors import ApiError, bad_request

__all__ = [
    "ROLES",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "GenerationFields",
    "StreamOptions",
    "parse_request",
]

T = TypeVar("T")

ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 4096
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


class ParamError(ValueError):
    """A value out of its range, raised by a validator; names the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check(param: str, ok: bool, message: str) -> None:
    if not ok:
        raise ParamError(param, message)


def _one_of(choices: tuple[str, ...]) -> Any:
    def validate(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}: {value!r}")

    return validate


@attrs.frozen(kw_only=True)
class ContentPart:
    """One part of a message's content; only text parts are supported."""

    type: str = attrs.field(validator=_one_of(("text",)))
    text: str


@attrs.frozen(kw_only=True)
class ChatMessage:
    """One message of a conversation."""

    role: str = attrs.field(validator=_one_of(ROLES))
    content: str | tuple[ContentPart, ...] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        """The message as a chat template takes it."""
        message = {"role": self.role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        return message


@attrs.frozen(kw_only=True)
class StreamOptions:
    """`stream_options`: with `include_usage`, a last chunk carries the token counts."""

    include_usage: bool = False


@attrs.frozen(kw_only=True)
class GenerationFields:
    """What both endpoints take besides the prompt."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | tuple[str, ...] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __attrs_post_init__(self) -> None:
        tokens = self.max_tokens
        _check("max_tokens", tokens is None or tokens >= 1, f"max_tokens must be >= 1: {tokens}")
        temp = self.temperature
        _check(
            "temperature", temp is None or 0 <= temp <= 2, f"temperature must be in [0, 2]: {temp}"
        )
        top_p = self.top_p
        _check("top_p", top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1]: {top_p}")
        seed = self.seed
        _check("seed", seed is None or 0 <= seed <= MAX_SEED, f"seed must be in [0, 2**63): {seed}")
        stops = self.stop_strings
        _check("stop", len(stops) <= MAX_STOPS, f"at most {MAX_STOPS} stop strings")
        _check(
            "stop",
            all(0 < len(s) <= MAX_STOP_CHARS for s in stops),
            f"stop strings must have 1 to {MAX_STOP_CHARS} characters",
        )
        _check("n", self.n == 1, f"only n=1 is supported: {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(name, getattr(self, name) == 0, f"{name} is not supported (only 0)")
        _check(
            "stream_options",
            self.stream_options is None or self.stream,
            "stream_options is only allowed with stream: true",
        )

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple (a single string is one stop string)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else self.stop

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


@attrs.frozen(kw_only=True)
class ChatCompletionRequest(GenerationFields):
    """`POST /v1/chat/completions`."""

    messages: tuple[ChatMessage, ...]
    max_completion_tokens: int | None = None
    logprobs: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        count = len(self.messages)
        _check("messages", 0 < count <= MAX_MESSAGES, f"1 to {MAX_MESSAGES} messages: {count}")
        limit = self.max_completion_tokens
        _check(
            "max_completion_tokens",
            limit is None or limit >= 1,
            f"max_completion_tokens must be >= 1: {limit}",
        )
        _check("logprobs", not self.logprobs, "logprobs are not supported")

    @property
    def token_limit(self) -> int | None:
        """The completion's token limit asked for (`max_completion_tokens` first)."""
        return self.max_completion_tokens or self.max_tokens


@attrs.frozen(kw_only=True)
class CompletionRequest(GenerationFields):
    """`POST /v1/completions` (one prompt string)."""

    prompt: str
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int = 1

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        _check("prompt", bool(self.prompt), "the prompt must not be empty")
        _check("echo", not self.echo, "echo is not supported")
        _check("logprobs", not self.logprobs, "logprobs are not supported")
        _check("suffix", self.suffix is None, "suffix is not supported")
        _check("best_of", self.best_of == 1, f"only best_of=1 is supported: {self.best_of}")

    @property
    def token_limit(self) -> int | None:
        """The completion's token limit asked for."""
        return self.max_tokens


# -- structuring -----------------------------------------------------------------------------


def _is_str_or_tuple(kind: Any) -> bool:
    args = set(get_args(kind))
    return str in args and any(getattr(a, "__origin__", None) is tuple for a in args)


def _str_or_tuple_hook(kind: Any, converter: cattrs.Converter) -> Any:
    # A string, or a list of the tuple's members (or None where the union allows it):
    # the JSON type alone tells which, so no guessing.
    args = get_args(kind)
    as_tuple = next(a for a in args if getattr(a, "__origin__", None) is tuple)
    nullable = type(None) in args

    def structure(value: Any, _: Any) -> Any:
        if value is None and nullable:
            return None
        if type(value) is str:
            return value
        if type(value) is list:
            return converter.structure(value, as_tuple)
        raise TypeError(f"expected a string or a list, got {type(value).__name__}")

    return structure


def _make_converter() -> cattrs.Converter:
    # The project's strict converter, plus "a string or a list of ..." fields (OpenAI's
    # `stop` and message `content`), which cattrs cannot tell apart on its own.
    converter = schema.CONVERTER.copy()
    converter.register_structure_hook_factory(_is_str_or_tuple, _str_or_tuple_hook)
    return converter


CONVERTER = _make_converter()
_PATH = re.compile(r" @ \$\.?(.*)$")


def _describe(exc: BaseException, _kind: Any = None) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unrecognized request argument supplied: {', '.join(sorted(exc.extra_fields))}"
    return str(exc) or type(exc).__name__


def _param_error(exc: BaseException) -> ParamError | None:
    if isinstance(exc, ParamError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _param_error(inner)
        if found is not None:
            return found
    return None


def parse_request(body: bytes, cls: type[T]) -> T:
    """The JSON `body` as a `cls`; `ApiError` 400 for bad JSON or a bad parameter."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if type(data) is not dict:
        raise bad_request("the request body must be a JSON object")
    try:
        return CONVERTER.structure(data, cls)
    except BaseValidationError as exc:
        ranged = _param_error(exc)
        if ranged is not None:
            raise bad_request(str(ranged), param=ranged.param) from None
        problem = cattrs.transform_error(exc, format_exception=_describe)[0]
        match = _PATH.search(problem)
        param = match.group(1) if match and match.group(1) else None
        message = _PATH.sub("", problem)
        raise bad_request(f"{param}: {message}" if param else message, param=param) from None
    except (TypeError, ValueError) as exc:
        raise bad_request(f"invalid request: {exc}") from None


def check_model(requested: str, served: str) -> None:
    """`ApiError` 404 unless `requested` is the model this server serves."""
    if requested != served:
        raise ApiError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served}`",
            param="model",
            code="model_not_found",
        )
