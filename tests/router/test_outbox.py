"""The outbox in front of a real protocol Endpoint: messages wait in order while the
transport is backed up, are admitted as it drains, and leave nothing behind per stream."""

from __future__ import annotations

from p2p_reliable import Endpoint, ProtocolConfig
from router.outbox import Outbox


def test_streams_that_waited_leave_nothing_behind_once_admitted() -> None:
    endpoint = Endpoint("A", epoch=1, config=ProtocolConfig(), seed=1)
    endpoint.add_peer("B", 0.0)
    backlog = {"B": 10_000}  # bytes waiting for the transport towards B: above the limit
    accepted: list[int] = []
    outbox = Outbox(
        endpoint,
        4096,
        lambda peer: backlog.get(peer or "", 0),
        lambda: accepted.append(1),
        lambda: 0.0,
    )
    for request in range(50):  # every request has streams of its own
        outbox.offer("B", f"request-{request}", b"x" * 100)
    assert not outbox.idle() and not accepted
    backlog["B"] = 0
    assert outbox.drained("B")
    assert len(accepted) == 50 and outbox.idle()
    assert outbox.streams_waiting == 0
    # Nothing is kept per stream once it was admitted: a later drain looks at no queue.
    assert not outbox.drained("B")
    assert endpoint.stats.messages_sent == 50
