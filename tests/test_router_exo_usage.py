"""Drive the router the way exo's main.py, master, worker and election use it, with two real
py-libp2p hosts, under asyncio and under trio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs
import pytest

from router import (
    CONNECTION_MESSAGES,
    ConnectionMessage,
    PublishPolicy,
    Receiver,
    Router,
    TypedTopic,
)

T = TypeVar("T")


@attrs.frozen
class Event:
    origin: str
    n: int


@attrs.frozen
class Command:
    text: str


@attrs.frozen
class ElectionMessage:
    clock: int
    candidate: str


GLOBAL_EVENTS = TypedTopic("global_events", PublishPolicy.Always, Event)
LOCAL_EVENTS = TypedTopic("local_events", PublishPolicy.Always, Event)
COMMANDS = TypedTopic("commands", PublishPolicy.Always, Command)
ELECTION_MESSAGES = TypedTopic("election_messages", PublishPolicy.Always, ElectionMessage)
DOWNLOAD_COMMANDS = TypedTopic("download_commands", PublishPolicy.Always, Command)
LOCAL_ONLY = TypedTopic("local_only", PublishPolicy.Never, Command)
MINIMAL = TypedTopic("minimal", PublishPolicy.Minimal, Command)
EXO_TOPICS: list[TypedTopic[Any]] = [
    GLOBAL_EVENTS,
    LOCAL_EVENTS,
    COMMANDS,
    ELECTION_MESSAGES,
    CONNECTION_MESSAGES,
    DOWNLOAD_COMMANDS,
    LOCAL_ONLY,
    MINIMAL,
]


async def _next(receiver: Receiver[T], timeout: float = 10.0) -> T:
    with anyio.fail_after(timeout):
        return await receiver.receive()


async def _nothing(receiver: Receiver[Any], wait: float = 0.5) -> None:
    with anyio.move_on_after(wait):
        item = await receiver.receive()
        raise AssertionError(f"unexpected item {item!r}")


async def _exo_like_session() -> None:
    a = Router.create()
    for topic in EXO_TOPICS:
        await a.register_topic(topic)
    # Receivers made before run(), as exo's Node.create does.
    a_conn = a.receiver(CONNECTION_MESSAGES)
    a_election = a.receiver(ELECTION_MESSAGES)
    a_commands = a.receiver(COMMANDS)
    a_local = a.receiver(LOCAL_ONLY)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await a.wait_ready()
        b = Router.create(bootstrap_peers=a.listen_addrs)
        for topic in EXO_TOPICS:
            await b.register_topic(topic)
        b_conn = b.receiver(CONNECTION_MESSAGES)
        b_election = b.receiver(ELECTION_MESSAGES)
        b_local = b.receiver(LOCAL_ONLY)
        b_minimal = b.receiver(MINIMAL)
        tg.start_soon(b.run)

        # Connection events on both sides name the other node.
        assert await _next(a_conn) == ConnectionMessage(node_id=b.node_id, connected=True)
        assert await _next(b_conn) == ConnectionMessage(node_id=a.node_id, connected=True)
        with anyio.fail_after(10):
            await a.wait_for_subscribers(ELECTION_MESSAGES.topic, 1)
            await b.wait_for_subscribers(ELECTION_MESSAGES.topic, 1)

        # Always: the sender's own receiver and the remote one both get it (exo's semantics).
        await a.sender(ELECTION_MESSAGES).send(ElectionMessage(1, a.node_id))
        assert await _next(a_election) == ElectionMessage(1, a.node_id)
        assert await _next(b_election) == ElectionMessage(1, a.node_id)

        # Never: local only.
        await a.sender(LOCAL_ONLY).send(Command("stay"))
        assert await _next(a_local) == Command("stay")
        await _nothing(b_local)

        # Minimal: no local receiver on A, so the network; B has one and keeps it local.
        await a.sender(MINIMAL).send(Command("over the wire"))
        assert await _next(b_minimal) == Command("over the wire")
        await b.sender(MINIMAL).send(Command("kept home"))
        assert await _next(b_minimal) == Command("kept home")

        # Re-election: exo closes old receivers and asks for new ones while running.
        a_commands.close()
        a_commands = a.receiver(COMMANDS)
        await b.sender(COMMANDS).send(Command("after re-election"))
        assert await _next(a_commands) == Command("after re-election")

        # A topic registered after start is subscribed at once.
        late = TypedTopic("late_topic", PublishPolicy.Always, Command)
        await a.register_topic(late)
        await b.register_topic(late)
        a_late = a.receiver(late)
        with anyio.fail_after(10):
            await b.wait_for_subscribers(late.topic, 1)
        await b.sender(late).send(Command("late"))
        assert await _next(a_late) == Command("late")

        # A payload of the wrong type is counted against its sender and dropped; the node
        # keeps working.
        wrong = TypedTopic(COMMANDS.topic, PublishPolicy.Always, bytes)
        b_raw = Router.create(bootstrap_peers=a.listen_addrs)
        await b_raw.register_topic(wrong)
        tg.start_soon(b_raw.run)
        await b_raw.wait_ready()
        with anyio.fail_after(10):
            await b_raw.wait_for_subscribers(COMMANDS.topic, 1)
        await b_raw.sender(wrong).send(b"\x00not a command")
        await b.sender(COMMANDS).send(Command("still alive"))
        assert await _next(a_commands) == Command("still alive")
        with anyio.fail_after(5):
            while a.bad_payloads[b_raw.node_id] < 1:
                await anyio.sleep(0.05)

        # Point to point, and B leaving shows up as a connection event.
        replies = a.direct_receiver("replies")
        await b.send_to(a.node_id, "replies", b"direct")
        message = await _next(replies)
        assert (message.peer, message.payload) == (b.node_id, b"direct")
        # A direct stream nobody reads yet: held until a reader comes (under asyncio the
        # delivery arrives in a plain callback, which must not be where a task is spawned).
        await b.send_to(a.node_id, "later", b"early")
        with anyio.fail_after(10):
            while "later" not in a._direct:
                await anyio.sleep(0.01)
        message = await _next(a.direct_receiver("later"))
        assert (message.peer, message.payload) == (b.node_id, b"early")
        await b.shutdown()
        await b_raw.shutdown()
        seen = set()
        with anyio.fail_after(10):
            while len(seen) < 2:
                event = await a_conn.receive()
                if not event.connected:
                    seen.add(event.node_id)
        assert seen == {b.node_id, b_raw.node_id}
        tg.cancel_scope.cancel()
    # After run() returns, receivers end cleanly.
    with pytest.raises((anyio.EndOfStream, anyio.ClosedResourceError)):
        await a_election.receive()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_exo_usage(backend: str) -> None:
    session: Callable[[], Awaitable[None]] = _exo_like_session
    anyio.run(session, backend=backend)
