"""A bare stand-in for `exo_rs`, for the BASELINE run of exo's tests only (exo unmodified).

exo's own `routing/router.py` and `routing/connection_message.py` import from `exo_rs` at
module level: `Keypair`, `NetworkingHandle`, `FromSwarm` and three exceptions. Without them
exo's master, election, API and main modules do not even import, so a baseline needs names
for all of them. This module gives the smallest that make exo's Python load and its tests
run: a real ed25519 `Keypair` (libp2p peer ids, as the Rust one), `FromSwarm` message
classes, the exceptions, and a `NetworkingHandle` that is alone on the network (subscribing
works, publishing finds no peers, nothing is ever received). It is not a router: exo's tests
never exercise a real one, which is why the live cluster is the real test of the adapter.

With the adapter applied, exo needs only `Pidfile` (see exo_rs_standin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from discovery.identity import key_pair_from_bytes

from .exo_rs_standin import Pidfile, PidfileError

__all__ = [
    "AllQueuesFullError",
    "FromSwarm",
    "Keypair",
    "MessageTooLargeError",
    "NetworkingHandle",
    "NoPeersSubscribedToTopicError",
    "Pidfile",
    "PidfileError",
]


class AllQueuesFullError(Exception):
    """Every peer's gossipsub queue is full."""


class MessageTooLargeError(Exception):
    """The message exceeds gossipsub's limit."""


class NoPeersSubscribedToTopicError(Exception):
    """Nobody subscribes to the topic."""


class Keypair:
    """An ed25519 identity; `to_node_id()` is its libp2p peer id (12D3KooW…)."""

    def __init__(self, key_pair: KeyPair) -> None:
        self.key_pair = key_pair

    @staticmethod
    def generate() -> Keypair:
        return Keypair(create_new_key_pair())

    @staticmethod
    def from_bytes(data: bytes) -> Keypair:
        return Keypair(key_pair_from_bytes(data))

    def to_bytes(self) -> bytes:
        return bytes(self.key_pair.private_key.to_bytes())

    def to_node_id(self) -> str:
        return str(ID.from_pubkey(self.key_pair.public_key).to_base58())


class FromSwarm:
    """What the swarm reports: a gossipsub message or a connection change."""

    class Connection:
        __match_args__ = ("peer_id", "connected")

        def __init__(self, peer_id: str, connected: bool) -> None:
            self.peer_id = peer_id
            self.connected = connected

    class Message:
        __match_args__ = ("origin", "topic", "data")

        def __init__(self, origin: str, topic: str, data: bytes) -> None:
            self.origin = origin
            self.topic = topic
            self.data = data


class NetworkingHandle:
    """A node alone on its network: no peers, nothing received."""

    def __init__(self, identity: Keypair, bootstrap_peers: Sequence[str], listen_port: int):
        self.identity = identity
        self.bootstrap_peers = list(bootstrap_peers)
        self.listen_port = listen_port
        self.topics: set[str] = set()

    async def recv(self) -> Any:
        await anyio.sleep_forever()

    async def gossipsub_subscribe(self, topic: str) -> bool:
        new = topic not in self.topics
        self.topics.add(topic)
        return new

    async def gossipsub_unsubscribe(self, topic: str) -> bool:
        known = topic in self.topics
        self.topics.discard(topic)
        return known

    async def gossipsub_publish(self, topic: str, data: bytes) -> None:
        raise NoPeersSubscribedToTopicError(topic)
