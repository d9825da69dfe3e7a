"""Calls from other threads onto a trio loop: the application's way into the engine.

`submit(fn)` queues `fn` and wakes the loop once per batch (never once per call); the loop
runs the batch, then `after()` (the engine hands what the calls produced to libp2p). Calls
submitted before `attach()` wait for the first `run_pending()`. And `loop_poster()`, the
other way: calls from the engine's (or any) thread onto the application's loop, either backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import sniffio
import trio

__all__ = ["LoopBridge", "loop_poster"]

log = logging.getLogger("p2pr.engine")


class LoopBridge:
    """A thread-safe queue of calls run on one trio loop."""

    def __init__(self, after: Callable[[], None]) -> None:
        self._after = after
        self._token: trio.lowlevel.TrioToken | None = None
        self._inbox: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False

    def attach(self) -> None:
        """Wake the calling trio loop for calls submitted from now on (call on it)."""
        self._token = trio.lowlevel.current_trio_token()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop (from any thread); dropped once the loop has finished."""
        with self._lock:
            self._inbox.append(fn)
            if self._wake_scheduled or self._token is None:
                return
            self._wake_scheduled = True
        try:
            self._token.run_sync_soon(self.run_pending)
        except trio.RunFinishedError:
            pass

    def query(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the loop (where its state may be read safely); its result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self.submit(run)
        return future

    def run_pending(self) -> None:
        """Run every submitted call, then `after()` (on the loop)."""
        with self._lock:
            self._wake_scheduled = False
            work = list(self._inbox)
            self._inbox.clear()
        for fn in work:
            try:
                fn()
            except Exception:
                log.exception("engine command failed")
        self._after()


def loop_poster() -> Callable[..., None]:
    """A thread-safe `post(fn, *args)` onto the calling event loop, for either backend.

    It never blocks, so it may be called from any thread, the loop's own included (a
    future's callback runs there when the future was done before the callback was added).
    """
    library = sniffio.current_async_library()
    call: Callable[..., Any]
    if library == "asyncio":
        call = asyncio.get_running_loop().call_soon_threadsafe
    elif library == "trio":
        call = trio.lowlevel.current_trio_token().run_sync_soon
    else:
        raise RuntimeError(f"unsupported async library {library!r}")

    def post(fn: Callable[..., None], *args: Any) -> None:
        try:
            call(fn, *args)
        except (RuntimeError, trio.RunFinishedError):
            pass  # the application's loop is gone: nobody is left to tell

    return post
