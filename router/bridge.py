"""Calls from other threads onto a trio loop: the application's way into the engine.

`submit(fn)` queues `fn` and wakes the loop once per batch (never once per call); the loop
runs the batch, then `after()` (the engine hands what the calls produced to libp2p). Calls
submitted before `attach()` wait for the first `run_pending()`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["LoopBridge"]

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
