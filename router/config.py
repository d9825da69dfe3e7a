"""How an engine runs its host (`EngineConfig`): addresses, discovery, the protocol's
settings, fault injection, and the limits one peer may use."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from p2p_reliable import ProtocolConfig

from .directs import DirectLimits
from .faults import FaultConfig
from .liveness import LivenessConfig
from .membership import Role
from .penalty import PenaltyConfig

__all__ = ["EngineConfig"]


def _names(names: Iterable[str]) -> frozenset[str]:
    # Typed, unlike a bare `frozenset`, which mypy's attrs plugin makes refuse every argument.
    return frozenset(names)


@attrs.frozen
class EngineConfig:
    """How the engine runs its host."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    bootstrap: tuple[str, ...] = ()
    static_peers: tuple[str, ...] = ()
    enable_mdns: bool = False
    # Shared by every node of a cluster: envelopes carry a keyed tag, strangers are refused.
    cluster_secret: bytes | None = None
    protocol: ProtocolConfig = attrs.field(factory=lambda: ProtocolConfig(flow_control=True))
    # Streams whose small messages go twice (added to `protocol.redundant_streams`): for
    # latency-critical messages with nothing behind them to reveal a loss, a second copy
    # `protocol.redundant_spacing` later repairs a lost frame at once, where a timer would wait
    # ~2 SRTT or more; the receiver drops the duplicate. Messages over `redundant_max_bytes`
    # (None: the protocol's) go once.
    redundant_streams: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    redundant_max_bytes: int | None = None
    faults: FaultConfig | None = None
    psk: str | None = None
    # gossipsub's per-peer outbound queue holds 32 RPCs and silently rejects the rest:
    # we publish only while every queue holds at most this many.
    gossip_queue_high_water: int = 8
    # Streams (all protocols, both directions) one peer may have open at once: py-libp2p's
    # stream limit is global, so one peer must not be able to use it up for everyone.
    max_streams_per_peer: int = 64
    # What one peer may make this node hold on its direct streams (router/directs.py).
    direct: DirectLimits = attrs.field(factory=DirectLimits)
    # A peer that keeps sending refused input is cut off for a while (router/penalty.py).
    penalty: PenaltyConfig = attrs.field(factory=PenaltyConfig)
    # New messages enter the protocol only while at most this many bytes wait for libp2p
    # (per topic set, per peer stream): retransmission timers start when a message enters,
    # so a long transport queue would make every timer fire early and flood the network.
    transport_backlog: int = 2 * 1024 * 1024
    # Topic frames at least this large go to each known subscriber over its direct stream
    # rather than through gossipsub, while the topic has at most bulk_max_subscribers. Measured
    # here: gossipsub signs, verifies and re-forwards every message, and moves 21 MB/s of
    # 256 KiB messages; direct streams move 53 MB/s. None: always gossipsub.
    bulk_unicast_bytes: int | None = 64 * 1024
    bulk_max_subscribers: int = 8
    subscriber_poll: float = 0.05
    redial_interval: float = 1.0
    # A member takes part in the cluster; an observer (`p2pr health`) only watches: peers
    # never announce it to their applications (exo would elect a new master on it).
    role: Role = Role.MEMBER
    # When a silent peer is found hung and its connection closed (router/liveness.py).
    liveness: LivenessConfig = attrs.field(factory=LivenessConfig)

    def protocol_config(self) -> ProtocolConfig:
        """`protocol` with `redundant_streams` and `redundant_max_bytes` applied."""
        if not self.redundant_streams and self.redundant_max_bytes is None:
            return self.protocol
        streams: frozenset[str] = self.protocol.redundant_streams.union(self.redundant_streams)
        return attrs.evolve(
            self.protocol,
            redundant_streams=streams,
            redundant_max_bytes=self.protocol.redundant_max_bytes
            if self.redundant_max_bytes is None
            else self.redundant_max_bytes,
        )
