"""Serving an ASGI app (Starlette) with hypercorn under whichever anyio backend runs.

The socket is bound here, before the server starts, so that the caller knows the port (0
picks a free one) and is told "started" only once connections are accepted: no polling.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import sniffio
from hypercorn.config import Config


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def server_config(sock: socket.socket, max_request_bytes: int = 1024 * 1024) -> Config:
    """hypercorn settings for a small internal server: quiet, bounded, short timeouts."""
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 5
    config.read_timeout = 30
    config.h11_max_incomplete_size = 16 * 1024
    config.max_app_queue_size = 10
    config.h2_max_inbound_frame_size = 16 * 1024
    config.websocket_max_message_size = max_request_bytes
    return config


async def serve_asgi(
    app: Any, sock: socket.socket, *, task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve `app` on the listening `sock` (hypercorn takes it over) until cancelled."""
    config = server_config(sock)
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve  # type: ignore[assignment]
    sock.detach()  # hypercorn owns the file descriptor from here on
    task_status.started()
    await serve(app, config, mode="asgi")
