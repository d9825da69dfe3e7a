"""router: exo's Router/TopicRouter interface, made reliable, over real py-libp2p hosts.

Typed topics travel over gossipsub and point-to-point messages over long-lived direct
streams, both through the p2p_reliable protocol (sequence numbers, checksums, acks/NACKs,
retransmission, in-order exactly-once delivery, flow control).
"""

from .bridge import loop_poster
from .channels import Receiver, Sender, channel
from .config import EngineConfig
from .faults import FaultConfig
from .interface import RouterLike
from .router import Router, RouterConfig
from .topic_router import DirectMessage, TopicRouter
from .topics import (
    CONNECTION_MESSAGES,
    ConnectionMessage,
    PublishPolicy,
    TopicDecodeError,
    TypedTopic,
)

__all__ = [
    "CONNECTION_MESSAGES",
    "ConnectionMessage",
    "DirectMessage",
    "EngineConfig",
    "FaultConfig",
    "PublishPolicy",
    "Receiver",
    "Router",
    "RouterConfig",
    "RouterLike",
    "Sender",
    "TopicDecodeError",
    "TopicRouter",
    "TypedTopic",
    "channel",
    "loop_poster",
]
