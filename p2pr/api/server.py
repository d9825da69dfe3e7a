"""Serving the API with hypercorn under the running anyio backend (trio or asyncio).

    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_api, backend, ApiSettings(host="127.0.0.1"), 8000)

The socket is bound before the server starts (`discovery.http.bind_tcp`), so the caller
learns the port (0 picks a free one) once connections are accepted. hypercorn's settings
are the project's small-server ones (`discovery.http.server_config`) but for the read
timeout: a streamed completion may run for minutes while the client sends nothing, and
hypercorn would close the connection (a "disconnect") after that timeout.
"""

from __future__ import annotations

from typing import Any

import anyio
import sniffio
from starlette.applications import Starlette

from discovery.http import bind_tcp, server_config

from .app import ApiSettings, create_app
from .auth import check_bind
from .backend import GenerationBackend

__all__ = ["serve_api", "serve_app"]


async def serve_api(
    backend: GenerationBackend,
    settings: ApiSettings,
    port: int,
    *,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Build the app (refusing an insecure bind) and serve it on `settings.host`:`port`
    until cancelled; `task_status.started(port bound)`."""
    app = create_app(backend, settings)
    await serve_app(app, settings.host, port, task_status=task_status)


async def serve_app(
    app: Starlette, host: str, port: int, *, task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve an app built by `create_app` on host:port until cancelled (its key rule is
    checked again for `host`: the app may have been built for another)."""
    check_bind(host, app.state.api.settings.api_key)
    sock = bind_tcp(host, port)
    bound = int(sock.getsockname()[1])
    config = server_config(sock)
    config.read_timeout = None
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve  # type: ignore[assignment]
    sock.detach()  # hypercorn owns the file descriptor from here on
    task_status.started(bound)
    asgi: Any = app  # hypercorn types the app as its own ASGI callable
    await serve(asgi, config, mode="asgi")
