"""A publisher's view of one receiver of one stream: what is in flight, its credit, its bytes.

A new message may go to a receiver only within four windows: the sequence credit it
advertised (`limit`), the publisher's own send window (`window_messages`, `window_bytes` of
unacknowledged data), the delay-based window towards the peer over all streams (congestion.py),
and the receiver's byte budget for this publisher over all streams (the `SendLedger`, charged
with each message until the receiver's limit shows it consumed). An empty window always admits
one message, however large.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

from .budget import SendLedger
from .config import ProtocolConfig
from .congestion import DelayWindow
from .rangeset import RangeSet


class WindowFull(Exception):
    """The stream cannot take another message until receivers acknowledge; wait for WindowOpen."""

    def __init__(self, stream: str, waiting_on: list[str]) -> None:
        super().__init__(f"window of stream {stream!r} is full (waiting on {waiting_on})")
        self.stream = stream
        self.waiting_on = waiting_on


@attrs.define(slots=True)
class InFlight:
    """One unacknowledged sequence number: its retransmissions and when it was sent."""

    attempt: int  # retransmissions so far (a planned redundant copy is not one)
    first_sent: float
    last_sent: float
    # Bytes in flight to the peer, over all streams, once it was first sent (itself
    # included): what its RTT sample measured the queue of (congestion.py).
    pipe: int = 0


@attrs.define
class SendWindow:
    """Everything a stream keeps about one of its receivers."""

    peer: str
    start: int
    limit: int  # flow control: sequence numbers at or above this must wait
    # In sequence order, which is the order of first transmission (loss detection relies on
    # it: the first entry is the oldest, the last the newest).
    unacked: dict[int, InFlight] = attrs.Factory(dict)
    pending_per_msg: dict[int, int] = attrs.Factory(dict)
    unacked_bytes: int = 0
    abandoned: RangeSet = attrs.Factory(RangeSet)
    failed: bool = False
    acked_floor: int = 0  # its cumulative ack: it has everything below
    largest_acked: int = -1  # the largest sequence number it acknowledged
    # A receiver that joined late may lack the retained messages below pin_stop: until it acks
    # them (or pin_until passes) they outlive retain_seconds, though not the byte bounds.
    pin_stop: int = 0
    pin_until: float = 0.0
    # Messages it may still hold (unconsumed, as far as its limit tells): start -> (end, cost).
    held: OrderedDict[int, tuple[int, int]] = attrs.Factory(OrderedDict)
    # Loss detection (detection.py): when to probe it next and probes it left unanswered;
    # RACK's most recently sent message it is known to have got (when it was sent, its seq,
    # the RTT it took), when a message sent before it counts as lost, and the lateness seen
    # of messages that arrived after later ones.
    probe_at: float | None = None
    probes: int = 0
    last_new_send: float = float("-inf")
    sent_quietly: bool = False  # its newest message followed a pause of at least ack_delay
    rack_sent: float = float("-inf")
    rack_seq: int = -1
    rack_rtt: float = 0.0
    rack_at: float | None = None
    reorder: float = 0.0

    def full(
        self,
        next_seq: int,
        size: int,
        cost: int,
        cfg: ProtocolConfig,
        ledger: SendLedger,
        congestion: DelayWindow | None = None,
    ) -> bool:
        """Whether a message of `size` bytes (costing the receiver `cost`) must wait.

        `congestion`: the window towards the peer, shared by all streams; a stream with
        nothing in flight passes it (so bulk data on one stream cannot hold back a token on
        another by more than one message in flight).
        """
        if next_seq >= self.limit or not ledger.fits(self.peer, cost):
            return True
        return bool(self.pending_per_msg) and (
            len(self.pending_per_msg) >= cfg.window_messages
            or self.unacked_bytes + size > cfg.window_bytes
            or (congestion is not None and not congestion.admits(size))
        )

    def hold(self, start: int, end: int, cost: int, ledger: SendLedger) -> None:
        """The message [start, end) went to this receiver, which may hold `cost` for it."""
        self.held[start] = (end, cost)
        ledger.add(self.peer, cost)

    def release_consumed(self, receive_window: int, ledger: SendLedger) -> None:
        """Its limit runs receive_window ahead of what its application consumed: release
        the messages below that."""
        consumed = self.limit - receive_window
        while self.held:
            start, (end, cost) = next(iter(self.held.items()))
            if end > consumed:
                return
            del self.held[start]
            ledger.remove(self.peer, cost)

    def release(self, start: int, ledger: SendLedger) -> None:
        """It will not hold the message at `start` (given up)."""
        entry = self.held.pop(start, None)
        if entry is not None:
            ledger.remove(self.peer, entry[1])

    def release_all(self, ledger: SendLedger) -> None:
        """It may have lost all it held (it left, perhaps to restart)."""
        for _, cost in self.held.values():
            ledger.remove(self.peer, cost)
        self.held.clear()
