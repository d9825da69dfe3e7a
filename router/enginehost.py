"""Where the engine's trio loop runs: as tasks of the application's own loop, or on a thread.

"shared": an application on trio may share its loop with the engine; a message then crosses
no thread on its way in or out, so it waits neither for a wakeup of the other thread nor for
the GIL (whose switch interval is 5 ms: under load, a message handed to another thread of
the process can wait that long). On asyncio (exo) the engine always has a thread of its own,
since py-libp2p needs trio.

"thread" (the default): the engine on a thread of its own. Its work (Noise encryption,
framing) then runs beside the application's (hashing, building payloads), on another core:
flat-out bulk transfers measured about twice as fast so on 2 cores. An application that
blocks its loop (a long computation inline) must keep it too, or peers would find the
engine silent.

`P2PR_ENGINE_LOOP=thread|shared` overrides `RouterConfig.engine_loop`, for A/B measurements.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import sniffio
import trio

from .engine import Engine

__all__ = ["ENGINE_LOOP_ENV", "ENGINE_THREAD", "EngineLoop", "hosted_engine", "shares_loop"]

ENGINE_LOOP_ENV = "P2PR_ENGINE_LOOP"
ENGINE_THREAD = "p2pr-engine"  # the name of the engine's own thread, when it has one
EngineLoop = Literal["thread", "shared"]

# How long a stopping engine may take to close its connections before it is cancelled.
_STOP_GRACE = 5.0


def shares_loop(setting: EngineLoop) -> bool:
    """Whether the engine runs on the calling loop (call on the application's loop): when
    "shared" is asked for and that loop is trio's."""
    chosen = os.environ.get(ENGINE_LOOP_ENV) or setting
    if chosen not in ("thread", "shared"):
        raise ValueError(f"{ENGINE_LOOP_ENV} must be thread or shared, not {chosen!r}")
    return chosen == "shared" and sniffio.current_async_library() == "trio"


@asynccontextmanager
async def hosted_engine(engine: Engine, shared: bool) -> AsyncIterator[None]:
    """Run `engine` while the block runs; it is ready on entry, stopped (gracefully) on exit.

    Raises RuntimeError if it fails to start; if it stops on its own, the block is cancelled
    and the failure raised.
    """
    host = _on_this_loop(engine) if shared else _on_own_thread(engine)
    async with host:
        yield


@asynccontextmanager
async def _on_this_loop(engine: Engine) -> AsyncIterator[None]:
    # Shielded: cancelling the application must not tear the engine down mid-frame; it is
    # asked to stop instead, and cancelled only if it has not closed within the grace time.
    shield = trio.CancelScope(shield=True)

    async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with shield:
            await engine.serve(task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            try:
                await nursery.start(serve)
            except Exception as exc:
                raise RuntimeError(f"libp2p engine failed to start: {exc!r}") from exc
            yield
        finally:
            engine.stop()
            shield.deadline = trio.current_time() + _STOP_GRACE


@asynccontextmanager
async def _on_own_thread(engine: Engine) -> AsyncIterator[None]:
    thread = threading.Thread(target=engine.run, name=ENGINE_THREAD, daemon=True)
    thread.start()
    try:
        await anyio.to_thread.run_sync(engine.ready.wait, abandon_on_cancel=True)
        if engine.error is not None:
            raise RuntimeError(f"libp2p engine failed to start: {engine.error}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_thread, engine, thread)
            yield
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_GRACE):
            engine.stop()
            await anyio.to_thread.run_sync(thread.join)


async def _watch_thread(engine: Engine, thread: threading.Thread) -> None:
    # The engine only stops when asked; if its thread ends on its own, say so loudly
    # rather than leaving an application that waits for messages that cannot come.
    await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
    raise RuntimeError(f"the libp2p engine stopped unexpectedly: {engine.error!r}")
