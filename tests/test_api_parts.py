"""The API's pure parts: stop strings over streamed text, request schemas, limits, bind rule."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pr.api import ApiError, ApiSettings, InsecureBindError, create_app
from p2pr.api.auth import is_loopback
from p2pr.api.generation import plan_generation
from p2pr.api.schemas import ChatCompletionRequest, CompletionRequest, parse_request
from p2pr.api.stops import StopScanner

ALPHABET = "ab🙂 "


def scan_pieces(pieces: list[str], stops: list[str]) -> tuple[list[str], bool, int]:
    """What the scanner shows for each piece (and at the end); whether it stopped; the most
    text it ever held back."""
    scanner = StopScanner(stops)
    shown: list[str] = []
    fed = held = 0
    for piece in pieces:
        result = scanner.feed(piece)
        shown.append(result.text)
        if result.stopped:
            return shown, True, held
        fed += len(piece)
        held = max(held, fed - len("".join(shown)))
    shown.append(scanner.flush())
    return shown, False, held


@given(
    pieces=st.lists(st.text(ALPHABET, max_size=4), max_size=12),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=4),
)
def test_stop_scanner_shows_exactly_the_text_before_the_first_stop(
    pieces: list[str], stops: list[str]
) -> None:
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    shown, stopped, held = scan_pieces(pieces, stops)
    assert stopped == bool(hits)
    assert "".join(shown) == (text[: min(hits)] if hits else text)
    # Only what could still become a stop string is held back.
    assert held <= max((len(s) - 1 for s in stops), default=0)


def test_stop_scanner_holds_back_a_split_stop_string() -> None:
    scanner = StopScanner(["</end>"])
    assert scanner.feed("Paris</").text == "Paris"
    assert scanner.feed("e").text == ""
    result = scanner.feed("nd> tail")
    assert (result.text, result.stopped) == ("", True)
    scanner = StopScanner(["</end>"])
    scanner.feed("a</e")
    assert scanner.feed("x").text == "</ex"
    assert scanner.flush() == ""
    with pytest.raises(ValueError):
        StopScanner([""])


def chat(**fields: object) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "3"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"stop": ""}, "stop"),
        ({"n": 2}, "n"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({"model": None}, "model"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bad_parameters_are_named(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_request(chat(**fields), ChatCompletionRequest)
    assert (caught.value.status, caught.value.param) == (400, param), caught.value.message


def test_requests_parse_strictly() -> None:
    request = parse_request(
        chat(
            stop="x",
            stream=True,
            stream_options={"include_usage": True},
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        ),
        ChatCompletionRequest,
    )
    assert request.stop_strings == ("x",) and request.include_usage
    assert request.messages[0].for_template() == {"role": "user", "content": "ab"}
    for body, needle in [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"\xff", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (chat(tools=[]), "unrecognized request argument supplied: tools"),
    ]:
        with pytest.raises(ApiError, match=needle):
            parse_request(body, ChatCompletionRequest)
    completion = parse_request(
        b'{"model": "m", "prompt": "p", "stop": ["a", "b"]}', CompletionRequest
    )
    assert completion.stop_strings == ("a", "b") and completion.token_limit is None


def test_context_limits_and_defaults() -> None:
    request = parse_request(chat(max_tokens=10), ChatCompletionRequest)
    plan = plan_generation(
        request, 10, [1] * 54, 64, default_max_tokens=512, default_temperature=0.0,
        prompt_param="messages",
    )  # fmt: skip
    assert (plan.max_tokens, plan.temp, plan.top_p, plan.seed) == (10, 0.0, 1.0, None)
    for prompt, limit in [(55, 10), (64, 1), (70, None)]:
        with pytest.raises(ApiError) as caught:
            plan_generation(
                request, limit, [1] * prompt, 64, default_max_tokens=512,
                default_temperature=0.0, prompt_param="messages",
            )  # fmt: skip
        assert caught.value.code == "context_length_exceeded"
    unlimited = parse_request(chat(temperature=0.5), ChatCompletionRequest)
    plan = plan_generation(
        unlimited, None, [1] * 60, 64, default_max_tokens=512, default_temperature=0.0,
        prompt_param="messages",
    )  # fmt: skip
    # What is left of the context; sampling without a seed gets a fresh one.
    assert plan.max_tokens == 4 and plan.temp == 0.5 and plan.seed is not None


def test_an_api_off_loopback_needs_a_key() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")
    backend = object()
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(InsecureBindError, match="without an API key"):
            create_app(backend, ApiSettings(host=host))  # type: ignore[arg-type]
        create_app(backend, ApiSettings(host=host, api_key="k"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        create_app(backend, ApiSettings(api_key=" "))  # type: ignore[arg-type]
