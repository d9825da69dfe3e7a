"""The engine on the application's own trio loop (`RouterConfig.engine_loop="shared"`): real
py-libp2p hosts, in one process here (two routers on one loop) and in separate processes in
tests/router/test_router_cluster.py."""

from __future__ import annotations

import threading

import anyio
import pytest

from router import CONNECTION_MESSAGES, PublishPolicy, Router, RouterConfig, TypedTopic
from router.enginehost import ENGINE_LOOP_ENV, ENGINE_THREAD, shares_loop

TOPIC = TypedTopic("engine-loop", PublishPolicy.Always, bytes)


def _router(bootstrap: list[str]) -> Router:
    return Router.create(bootstrap_peers=bootstrap, config=RouterConfig(engine_loop="shared"))


def _engine_threads() -> int:
    return sum(t.name == ENGINE_THREAD for t in threading.enumerate())


def test_shared_means_a_trio_loop_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async def asked(setting: str) -> bool:
        return shares_loop(setting)  # type: ignore[arg-type]

    monkeypatch.delenv(ENGINE_LOOP_ENV, raising=False)
    assert anyio.run(asked, "shared", backend="trio") is True
    assert anyio.run(asked, "shared", backend="asyncio") is False  # py-libp2p needs trio
    assert anyio.run(asked, "thread", backend="trio") is False
    monkeypatch.setenv(ENGINE_LOOP_ENV, "thread")
    assert anyio.run(asked, "shared", backend="trio") is False
    monkeypatch.setenv(ENGINE_LOOP_ENV, "sideways")
    with pytest.raises(ValueError, match=ENGINE_LOOP_ENV):
        anyio.run(asked, "shared", backend="trio")


def test_two_routers_on_one_loop_deliver_and_part_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_LOOP_ENV, raising=False)
    count = 300
    threads_before = _engine_threads()

    async def main() -> None:
        a = _router([])
        await a.register_topic(TOPIC)
        async with anyio.create_task_group() as outer:
            a_scope = anyio.CancelScope()

            async def run_a() -> None:
                with a_scope:
                    await a.run()

            outer.start_soon(run_a)
            with anyio.fail_after(30):
                await a.wait_ready()
            b = _router(a.listen_addrs[:1])
            await b.register_topic(TOPIC)
            await b.register_topic(CONNECTION_MESSAGES)
            connections = b.receiver(CONNECTION_MESSAGES)
            topic_items, directs = b.receiver(TOPIC), b.direct_receiver(TOPIC.topic)
            outer.start_soon(b.run)
            with anyio.fail_after(30):
                await b.wait_ready()
                await a.wait_for_subscriber(TOPIC.topic, b.node_id)
            # Both engines run as tasks of this loop: no engine thread was started.
            assert _engine_threads() == threads_before
            sender = a.sender(TOPIC)
            with anyio.fail_after(60):
                for i in range(count):
                    await sender.send(b"t%d" % i)
                    await a.send_to(b.node_id, TOPIC.topic, b"d%d" % i)
                got_topic = [await topic_items.receive() for _ in range(count)]
                got_direct = [(await directs.receive()).payload for _ in range(count)]
                await a.drain()
            assert got_topic == [b"t%d" % i for i in range(count)]
            assert got_direct == [b"d%d" % i for i in range(count)]
            # Cancelling the application stops its engine gracefully: it closes its
            # connections, so the peer hears of it at once rather than by silence.
            a_scope.cancel()
            with anyio.fail_after(10):
                async for message in connections:
                    if message.node_id == a.node_id and not message.connected:
                        break
            outer.cancel_scope.cancel()

    anyio.run(main, backend="trio")
