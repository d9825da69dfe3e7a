"""What an `Endpoint` tells its application: small frozen classes, drained with next_event()."""

from __future__ import annotations

import attrs


@attrs.frozen
class Event:
    """Base class of every event."""


@attrs.frozen
class Delivered(Event):
    """A whole message from `origin`, in order, exactly once, its checksum verified."""

    origin: str
    stream: str
    seq: int
    payload: bytes
    direct: bool = False
    end: int = 0  # the sequence number after this message's last fragment (for consumed())


@attrs.frozen
class Gap(Event):
    """Sequence numbers [start, stop) from `origin` are lost for good; delivery went on after."""

    origin: str
    stream: str
    start: int
    stop: int
    reason: str
    direct: bool = False


@attrs.frozen
class Unrecoverable(Event):
    """The message starting at `seq` could not be delivered to `peer`: the retry budget ran
    out ("retry budget exhausted"), or the peer is gone ("peer removed", "unsubscribed")."""

    stream: str
    seq: int
    peer: str
    reason: str = "retry budget exhausted"


@attrs.frozen
class WindowOpen(Event):
    """A stream that refused a send (WindowFull) can take messages again."""

    stream: str
    peer: str | None = None  # the destination of a direct stream; None for a topic


@attrs.frozen
class Rejected(Event):
    """Input from `peer` was refused and counted; nothing was delivered from it."""

    peer: str
    reason: str


@attrs.frozen
class PeerUnreachable(Event):
    """`peer` stopped acknowledging `stream`; new messages no longer wait for it."""

    peer: str
    stream: str
