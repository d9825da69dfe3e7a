"""A stage node's answer to the protocol giving up on one of its pipeline messages.

The router reports a message to a peer that could not be delivered (`Unrecoverable`: the
connection closed with it unacknowledged, or the retry budget ran out) and a message from a
peer that is lost for good (`Gap`; one its publisher gave up is the publisher's to report).
A request whose hidden state, token feedback, share of the head or token chunk was in it
cannot go on, and nobody else may know: the client sees every stage alive and connected
while the link between two of them broke (a hung-peer verdict, a reconnection), and would
wait for a token that never comes.

The messages of all requests between two nodes share one stream, so a verdict cannot say
whose message it was: every request in flight through that peer fails, with kind "lost" and
the peer as suspect, and its client resumes it (on the same plan when the suspect still
answers). The failure goes through the node's worker, in order with the request's messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio
import anyio.abc
import attrs

from inference_glue.messages import (
    ACTIVATION_STREAM,
    CHUNK_STREAM,
    HEAD_STREAM,
    TOKEN_STREAM,
    TOKENS,
    RequestMeta,
)
from inference_glue.node_inbox import Work
from p2p_reliable import NOT_REPAIRED, Gap, Unrecoverable
from router import RouterLike

__all__ = [
    "LINK_LOSS",
    "PIPELINE_STREAMS",
    "LinkLossWatch",
    "LinkLost",
    "LinkLostError",
    "affected",
]

LINK_LOSS = "link-loss"  # the `Work.stream` of a `LinkLost`: the node's own, not a wire stream

# The streams a request's progress depends on, between stages and to the requester.
PIPELINE_STREAMS = frozenset({ACTIVATION_STREAM, TOKEN_STREAM, HEAD_STREAM})
REQUESTER_STREAMS = frozenset({CHUNK_STREAM, TOKENS.topic})


@attrs.frozen
class LinkLost:
    """A work item of the node for itself (never on the wire): request `request_id` lost a
    message to or from `peer`, as `detail` says."""

    request_id: str
    peer: str
    detail: str


class LinkLostError(RuntimeError):
    """A request cannot go on: one of its messages is lost (`LinkLost`)."""

    def __init__(self, lost: LinkLost) -> None:
        super().__init__(lost.detail)
        self.peer = lost.peer


def affected(event: object, requests: Iterable[RequestMeta]) -> list[LinkLost]:
    """The requests among `requests` that `event` (a protocol verdict) breaks."""
    if isinstance(event, Unrecoverable):
        peer, stream = event.peer, event.stream
        detail = f"a message on {stream} to {peer} was given up ({event.reason})"
    elif isinstance(event, Gap):
        if event.reason == NOT_REPAIRED:
            # Its publisher gave it up and reports that itself (an Unrecoverable there);
            # here it may come late, when another attempt of the request is in flight.
            return []
        peer, stream = event.origin, event.stream
        detail = f"messages {event.start}-{event.stop - 1} on {stream} from {peer} are lost"
    else:
        return []
    if stream in PIPELINE_STREAMS:
        hit = [m for m in requests if peer in m.route]
    elif stream in REQUESTER_STREAMS:
        hit = [m for m in requests if m.reply_to == peer]
    else:
        return []
    return [LinkLost(m.request_id, peer, detail) for m in hit]


class LinkLossWatch:
    """Follows `router`'s protocol verdicts (`run`) and queues a `LinkLost` for the node's
    worker for every request in flight (`requests()`) that one breaks."""

    def __init__(self, router: RouterLike, requests: Callable[[], Iterable[RequestMeta]]) -> None:
        self.router = router
        self._requests = requests

    async def run(self, work: anyio.abc.ObjectSendStream[Work]) -> None:
        """Until cancelled. The router keeps its recent verdicts in a bounded deque: the
        new ones are those that were not there at the last look. (`events` holds the last
        look's alive while the next verdicts are made, so none can take one's identity.)"""
        async with work:
            events = list(self.router.protocol_events)
            while True:
                seen = {id(e) for e in events}
                if all(id(e) in seen for e in self.router.protocol_events):
                    # Nothing awaits from this look to the wait: no verdict slips in between.
                    await self.router.wait_protocol_event()
                events = list(self.router.protocol_events)
                broken = [
                    lost
                    for event in events
                    if id(event) not in seen
                    for lost in affected(event, self._requests())
                ]
                for lost in broken:
                    await work.send(Work(LINK_LOSS, lost.peer, lost))
