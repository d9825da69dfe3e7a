"""Where a stage node runs its MLX work (`inference_glue.worker`): the event loop is woken
when the work is done, however soon that is."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from inference_glue.worker import MlxWorker


class DoneBeforeReturning(concurrent.futures.ThreadPoolExecutor):
    """Fault injection: the worker thread finishes the call before `submit` returns (as when
    the caller loses the CPU, or the GIL, right after handing the call over). Before the
    fix the future's callback then ran on the loop's thread and blocked it for good: a
    stage node whose requests stopped without a word while its engine thread kept
    answering heartbeats."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future = super().submit(fn, *args, **kwargs)
        concurrent.futures.wait([future])
        return future


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_work_done_before_the_wait_begins_still_wakes_the_loop(backend: str) -> None:
    worker = MlxWorker("thread")
    worker._executor = DoneBeforeReturning(1)  # the one thread, as MlxWorker's own
    results: list[list[int]] = []

    async def main() -> None:
        results.append([await worker.run(lambda n=n: n * n) for n in range(3)])

    # The loop runs on a thread of its own: a frozen loop cannot time itself out.
    loop = threading.Thread(target=anyio.run, args=(main,), kwargs={"backend": backend})
    loop.daemon = True
    loop.start()
    loop.join(timeout=30)
    worker.close()
    assert not loop.is_alive(), "the event loop froze waiting on itself"
    assert results == [[0, 1, 4]]


def test_a_thread_worker_runs_every_call_on_one_thread() -> None:
    worker = MlxWorker("thread")

    async def main() -> set[int]:
        return {await worker.run(threading.get_ident) for _ in range(5)}

    try:
        [ident] = anyio.run(main, backend="trio")
        assert ident != threading.get_ident()
    finally:
        worker.close()
