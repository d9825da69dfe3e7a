"""Bearer-key authentication (OpenAI-style `Authorization: Bearer KEY`) and the rule that an
API bound off loopback must have a key.

The check is an ASGI middleware in front of every `/v1/` route; `GET /health` stays open
for load balancers and says nothing about the conversations.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError

__all__ = ["BearerAuth", "InsecureBindError", "check_bind", "is_loopback"]

MAX_KEY_BYTES = 1024


class InsecureBindError(ValueError):
    """An API bound to a non-loopback address without an API key."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for any other address or name
    (0.0.0.0 and :: listen on every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse an API reachable from other machines without a key."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key must not be empty")
    if api_key is not None and len(api_key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"the API key must be at most {MAX_KEY_BYTES} bytes")
    if not is_loopback(host) and api_key is None:
        raise InsecureBindError(
            f"the API would listen on {host}, reachable from other machines, without an API "
            "key: give one (--api-key, sent by clients as 'Authorization: Bearer KEY') or "
            "bind to 127.0.0.1"
        )


class BearerAuth:
    """Answers 401 in OpenAI's shape to a request under `prefix` without the right key."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1/") -> None:
        self.app = app
        self.key = api_key.encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization")
        error = self._problem(header)
        if error is None:
            await self.app(scope, receive, send)
            return
        await error.response()(scope, receive, send)

    def _problem(self, header: bytes | None) -> ApiError | None:
        if header is None:
            return ApiError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                code="missing_api_key",
            )
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            return ApiError(401, "Incorrect API key provided", code="invalid_api_key")
        return None
