"""The in-memory router double (`router.memory`): what the in-process tests of the stage node
and the client rely on behaves as the real router does (typed topics through the same
TopicRouters, local fan-out, held direct messages, connection events), plus the faults the
double offers (kill, hang, partition)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import attrs
import pytest

from p2p_reliable import Unrecoverable
from router import CONNECTION_MESSAGES, PublishPolicy, RouterLike, TypedTopic
from router.memory import MemoryNetwork, MemoryRouter


@attrs.frozen
class Note:
    text: str
    n: int


NOTES = TypedTopic("notes", PublishPolicy.Always, Note)


@asynccontextmanager
async def running(*routers: MemoryRouter) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for router in routers:
            tg.start_soon(router.run)
        for router in routers:
            await router.wait_ready()
        yield
        tg.cancel_scope.cancel()


def test_one_router_per_name() -> None:
    network = MemoryNetwork()
    router: RouterLike = network.router("a")
    assert router.node_id == "a" and router.listen_addrs == ["/memory/a/p2p/a"]
    with pytest.raises(ValueError):
        network.router("a")


async def test_typed_topics_reach_every_subscriber_and_the_local_receivers() -> None:
    network = MemoryNetwork()
    a, b, c = (network.router(name) for name in "abc")
    for router in (a, b):
        await router.register_topic(NOTES)
    received = {name: r.receiver(NOTES) for name, r in (("a", a), ("b", b))}
    async with running(a, b, c):
        assert a.subscribers(NOTES.topic) == {"b"}  # c never registered the topic
        with anyio.fail_after(5):
            await a.sender(NOTES).send(Note("hi", 1))
            assert await received["b"].receive() == Note("hi", 1)
            assert await received["a"].receive() == Note("hi", 1)  # as exo's: local too
        # An item that is not a Note is counted against its sender, not delivered: the next
        # good one is what arrives (in order, so the bad one was handled by then).
        await b.publish_encoded(NOTES.topic, b"\x93not a note")
        await b.sender(NOTES).send(Note("after", 2))
        with anyio.fail_after(5):
            assert await received["a"].receive() == Note("after", 2)
        assert a.bad_payloads == {"b": 1} and a.refusals[("b", "bad payload")] == 1


async def test_direct_messages_wait_for_their_receiver() -> None:
    network = MemoryNetwork()
    a, b = network.router("a"), network.router("b")
    async with running(a, b):
        await a.send_to("b", "replies", b"early")  # nobody reads "replies" on b yet
        inbox = b.direct_receiver("replies")
        with anyio.fail_after(5):
            message = await inbox.receive()
        assert (message.peer, message.stream, message.payload) == ("a", "replies", b"early")


async def test_connections_open_and_close_with_the_routers() -> None:
    network = MemoryNetwork()
    a, b = network.router("a"), network.router("b")
    await a.register_topic(CONNECTION_MESSAGES)
    events = a.receiver(CONNECTION_MESSAGES)
    async with running(a, b):
        with anyio.fail_after(5):
            first = await events.receive()
        assert (first.node_id, first.connected) == ("b", True) and a.connected == {"b"}
        network.kill("b")
        with anyio.fail_after(5):
            gone = await events.receive()
        assert (gone.node_id, gone.connected) == ("b", False) and a.connected == set()
        await a.send_to("b", "s", b"lost")  # to a peer that is gone: dropped, no error


async def test_a_hung_router_is_dead_in_health_and_gets_nothing() -> None:
    network = MemoryNetwork()
    a, b = network.router("a"), network.router("b")
    inbox = b.direct_receiver("s")
    async with running(a, b):
        assert await a.health_states() == {"b": "ALIVE"}
        network.hang("b")
        assert await a.health_states() == {"b": "DEAD"} and a.connected == {"b"}
        await a.send_to("b", "s", b"while hung")
        network.resume("b")
        await a.send_to("b", "s", b"after")
        with anyio.fail_after(5):
            assert (await inbox.receive()).payload == b"after"  # the hung one was lost
        a.set_faults(None, ["b"])  # a partition: nothing gets through either way
        await a.send_to("b", "s", b"cut")
        [verdict] = a.protocol_events  # given up at once, as the budget would in the end
        assert isinstance(verdict, Unrecoverable) and (verdict.peer, verdict.stream) == ("b", "s")
        a.set_faults(None, [])
        await a.send_to("b", "s", b"healed")
        with anyio.fail_after(5):
            assert (await inbox.receive()).payload == b"healed"


async def test_waiting_for_a_subscriber_is_woken_by_its_registration() -> None:
    network = MemoryNetwork()
    a, b = network.router("a"), network.router("b")
    async with running(a, b):
        async with anyio.create_task_group() as tg:

            async def register_later() -> None:
                await anyio.sleep(0)
                await b.register_topic(NOTES)

            tg.start_soon(register_later)
            with anyio.fail_after(5):
                await a.wait_for_subscriber(NOTES.topic, "b")
        assert a.subscribers(NOTES.topic) == {"b"}
