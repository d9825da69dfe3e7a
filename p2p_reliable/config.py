"""Tunables of the protocol, with defaults chosen for a LAN cluster over py-libp2p."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from .health import HealthConfig
from .recovery import RetryPolicy


def _stream_names(names: Iterable[str]) -> frozenset[str]:
    # A typed converter: with the bare `frozenset`, mypy's attrs plugin makes the parameter
    # `Iterable[_T_co]` and refuses every argument.
    return frozenset(names)


KiB = 1024
MiB = 1024 * KiB


@attrs.frozen
class ProtocolConfig:
    """Every knob of an `Endpoint`; validated so that the parts cannot deadlock each other."""

    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    health: HealthConfig = attrs.field(factory=HealthConfig)
    # Admission: a new message waits while any receiver of its stream has this many messages
    # (or bytes) unacked. An empty window always admits one message, however large.
    window_messages: int = 256
    # About the bandwidth-delay product of a LAN link as py-libp2p drives it (~60 MB/s x
    # ~50 ms). It is the ceiling of a delay-based window per peer (congestion.py) that keeps
    # the queueing delay towards the peer near queue_delay_target (None: no such window),
    # down to min_window_bytes.
    window_bytes: int = 4 * MiB
    queue_delay_target: float | None = 0.05
    min_window_bytes: int = 256 * KiB
    # Join semantics: a topic message stays retained retain_seconds after publication, even
    # once every receiver has it, so a subscriber the publisher learns of late (the router
    # polls gossipsub every 50 ms, seconds under load) still gets everything published since it
    # subscribed. 10 s covers that delay with a wide margin and lets memory turn over quickly.
    retain_seconds: float = 10.0
    # Per topic stream. 8 MiB is seconds of control traffic (bulk data goes on direct streams,
    # which retain nothing); 4096 small messages are one receive_window and half the reorder
    # window, so a late joiner can buffer all it must repair. Past either bound, or past
    # retain_total_bytes over all topics, the oldest go early, and a late joiner that was owed
    # them gets a Gap. Messages some receiver still waits for are never evicted.
    retain_messages: int = 4096
    retain_bytes: int = 8 * MiB
    retain_total_bytes: int = 64 * MiB
    # py-libp2p drops RPCs over 1 MiB on the receiving side: stay well under it.
    max_fragment_payload: int = 512 * KiB
    max_message_size: int = 128 * MiB
    compress_threshold: int = 16 * KiB
    compress_level: int = 3
    # Receiver side. With flow_control the application reports what it consumed
    # (Endpoint.consumed) and a publisher may run at most receive_window sequence numbers
    # ahead of that, so a slow consumer slows the publisher instead of losing messages.
    flow_control: bool = False
    receive_window: int = 4096
    reorder_max_ahead: int = 8192
    # Receive bounds (README "Receive bounds"). Sequence credit alone would let one stream
    # hold receive_window x max_fragment_payload = 2 GiB: bytes are bounded per publisher over
    # all its streams (reorder buffers, plus with flow_control what the application was given
    # and has not consumed) and over all publishers; data beyond them is dropped unacked and
    # sent again later. 32 MiB is 8 send windows (window_bytes), far more than a LAN link
    # keeps in flight to one peer; 128 MiB is four such peers at once. One head-of-line
    # message may pass each bound (an empty window admits one message, however large), so the
    # worst cases are peer_receive_bytes and total_receive_bytes plus one max_message_size.
    # Publishers hold back what would exceed a receiver's peer_receive_bytes (the same in the
    # whole cluster) and compress nothing larger.
    peer_receive_bytes: int = 32 * MiB
    total_receive_bytes: int = 128 * MiB
    # Inbound receivers: direct stream names per publisher (the router's pipeline uses a
    # handful of fixed names; 64 leaves ample room) and in total (64 busy peers' worth).
    max_direct_streams_per_peer: int = 64
    max_inbound_streams: int = 4096
    # A direct stream's receiver with nothing left to do (all delivered and consumed, no
    # hole) that heard nothing this long is freed down to a resume point; so is any receiver
    # of a removed peer, its holes reported lost first. Longer than the gap timeout (~17 s by
    # default), so that a removed peer's holes are mostly settled by then anyway.
    idle_stream_timeout: float = 60.0
    # Resume points (epoch, next seq) of freed receivers and unsubscribed topics: about 0.5 KiB
    # each at most. 256 per publisher outlasts its 64 live direct streams several times.
    resume_points_per_peer: int = 256
    max_resume_points: int = 8192
    # The longest a receiver holds an ack back (the probe timeout allows for it).
    ack_delay: float = 0.005
    ack_every: int = 8
    nack_delay: float = 0.06  # Aeron's NAK delay: lets reordered messages arrive first
    nack_backoff_cap: float = 1.0
    # A hole the publisher neither fills nor declares lost is given up after this long. It must
    # exceed the publisher's retry budget (retry.max_span()) so that the publisher always
    # gives up first.
    gap_timeout: float | None = None
    heartbeat_interval: float = 0.1
    max_frame_bytes: int = 900 * KiB
    # Redundancy for small latency-critical messages (hidden states, tokens): each message of
    # these streams (or any sent with redundant=True) up to redundant_max_bytes goes a second
    # time redundant_spacing later, unless acknowledged by then, so that a lost frame costs
    # the spacing instead of a repair. Bytes are cheap; the receiver suppresses duplicates.
    redundant_streams: frozenset[str] = attrs.field(default=frozenset(), converter=_stream_names)
    redundant_max_bytes: int = 64 * KiB
    redundant_spacing: float = 0.002

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.max_fragment_payload < 64 or self.max_fragment_payload > self.max_frame_bytes:
            problems.append("max_fragment_payload must be in [64, max_frame_bytes]")
        fragments = -(-(self.max_message_size + 8) // self.max_fragment_payload)
        if fragments + self.receive_window > self.reorder_max_ahead:
            problems.append("reorder_max_ahead cannot hold receive_window plus one message")
        if not 0 < self.peer_receive_bytes <= self.total_receive_bytes:
            problems.append("need 0 < peer_receive_bytes <= total_receive_bytes")
        if (
            min(self.max_direct_streams_per_peer, self.max_inbound_streams) < 1
            or min(self.resume_points_per_peer, self.max_resume_points) < 1
        ):
            problems.append("stream and resume point caps must be positive")
        if self.idle_stream_timeout <= 0:
            problems.append("idle_stream_timeout must be positive")
        if min(self.window_messages, self.ack_every, self.receive_window) < 1 or (
            self.heartbeat_interval <= 0
        ):
            problems.append("window_messages, ack_every and heartbeat_interval must be positive")
        if min(self.retain_seconds, self.retain_messages, self.retain_bytes) < 0 or (
            self.retain_total_bytes < 0
        ):
            problems.append("retention bounds must not be negative")
        if self.queue_delay_target is not None and not self.queue_delay_target > 0:
            problems.append("queue_delay_target must be positive (or None)")
        if self.redundant_max_bytes < 0 or self.redundant_spacing < 0:
            problems.append("redundant_max_bytes and redundant_spacing must not be negative")
        if self.gap_timeout is not None and self.gap_timeout <= self.retry.max_span():
            problems.append("gap_timeout must exceed retry.max_span()")
        if problems:
            raise ValueError("invalid ProtocolConfig: " + "; ".join(problems))

    @property
    def effective_gap_timeout(self) -> float:
        """`gap_timeout`, or just over the publisher's retry span when unset."""
        if self.gap_timeout is not None:
            return self.gap_timeout
        return self.retry.max_span() + 1.0
