"""p2p_reliable: a sans-IO reliability protocol for messages over best-effort pub/sub.

Envelopes carry sequence numbers and an xxh3-64 checksum of their exact bytes; receivers ack,
NACK holes, suppress duplicates and deliver in order per publisher; publishers repair what
acknowledgements show missing (RACK), probe a silent tail (RFC 8985), may send small messages
twice, keep the queue towards each peer short (a delay-based window), and end with an explicit
Unrecoverable verdict when a peer is removed or a time budget runs out. Large messages are
compressed and fragmented. `Endpoint` is the whole protocol for one node.
"""

from .config import KiB, MiB, ProtocolConfig
from .control import AckInfo, StreamMark
from .endpoint import Endpoint, Transmit
from .envelope import ChecksumError, DecodeError, Envelope, Flags, Kind, checksum, decode, encode
from .events import Delivered, Event, Gap, PeerUnreachable, Rejected, Unrecoverable, WindowOpen
from .fragment import MessageCodec, MessageTooLarge, ReassemblyError
from .health import HealthConfig, HealthSnapshot, HealthTable, PeerHealth, PeerState, PhiAccrual
from .losses import NOT_REPAIRED
from .rangeset import RangeSet
from .recovery import RetryPolicy, RttEstimator
from .sender import WindowFull
from .stats import EndpointStats

__all__ = [
    "NOT_REPAIRED",
    "AckInfo",
    "ChecksumError",
    "DecodeError",
    "Delivered",
    "Endpoint",
    "EndpointStats",
    "Envelope",
    "Event",
    "Flags",
    "Gap",
    "HealthConfig",
    "HealthSnapshot",
    "HealthTable",
    "KiB",
    "Kind",
    "MessageCodec",
    "MessageTooLarge",
    "MiB",
    "PeerHealth",
    "PeerState",
    "PeerUnreachable",
    "PhiAccrual",
    "ProtocolConfig",
    "RangeSet",
    "ReassemblyError",
    "Rejected",
    "RetryPolicy",
    "RttEstimator",
    "StreamMark",
    "Transmit",
    "Unrecoverable",
    "WindowFull",
    "WindowOpen",
    "checksum",
    "decode",
    "encode",
]
