"""Where a stage node runs its MLX work: inline on the event loop, or on one dedicated thread.

MLX keeps streams per thread, so all of a node's MLX work (loading included) stays on one
thread: "thread" (the stage nodes' default) is one long-lived worker thread (not a pool, whose
threads would change between calls), and the event loop keeps serving the network meanwhile;
"inline" is the event loop's thread. `p2pr bench generate` on a quiet 2-core machine, SmolLM2,
2 stages: 0.885x (0.847-0.923) the single process with "thread", 0.767x (0.732-0.837) inline.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from router import loop_poster

__all__ = ["COMPUTE_MODES", "MlxWorker"]

T = TypeVar("T")

COMPUTE_MODES = ("inline", "thread")


class MlxWorker:
    """Where a node runs its MLX work: inline on the event loop, or on one dedicated thread.

    MLX keeps streams per thread, so all of a node's MLX work (loading included) stays on one
    thread: "inline" is the event loop's thread; "thread" is one long-lived worker thread
    (not a pool, whose threads would change between calls).
    """

    def __init__(self, mode: str) -> None:
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {mode!r}")
        self.mode = mode
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx")
            if mode == "thread"
            else None
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the MLX thread; the event loop keeps running meanwhile in "thread"
        mode."""
        if self._executor is None:
            return fn(*args)
        post = loop_poster()
        done = anyio.Event()
        future = self._executor.submit(fn, *args)
        # Not a blocking call back into the loop (anyio.from_thread): a call done before the
        # callback is added runs the callback here, on the loop's thread, which would wait
        # on itself forever (the node's loop frozen, its engine thread still answering).
        future.add_done_callback(lambda _: post(done.set))
        await done.wait()
        return future.result()

    def close(self) -> None:
        """Let the worker thread finish its current call and end."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
