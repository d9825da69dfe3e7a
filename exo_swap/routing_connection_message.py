"""exo's `exo.routing.connection_message`, without `exo_rs`.

exo's ConnectionMessage is a pydantic FrozenModel (node_id: NodeId, connected: bool) built
from the swarm's connection updates. Here the updates come from p2p-reliable's engine (a
connection to a peer opened or closed); `from_update` takes anything with `peer_id` and
`connected`, as exo_rs's `FromSwarm.Connection` has.

This module must not import exo's topics or router at module level: exo's election imports
it, and topics imports election (a cycle).
"""

from __future__ import annotations

from typing import Protocol

from exo.shared.types.common import NodeId  # type: ignore[import-not-found]
from exo.utils.pydantic_ext import FrozenModel  # type: ignore[import-not-found]

__all__ = ["ConnectionMessage", "ConnectionUpdate"]


class ConnectionUpdate(Protocol):
    """A connection change as the swarm reports it (exo_rs's FromSwarm.Connection)."""

    @property
    def peer_id(self) -> str: ...
    @property
    def connected(self) -> bool: ...


class ConnectionMessage(FrozenModel):
    """A connection to `node_id` opened (connected=True) or closed."""

    node_id: NodeId
    connected: bool

    @classmethod
    def from_update(cls, update: ConnectionUpdate) -> ConnectionMessage:
        return cls(node_id=NodeId(update.peer_id), connected=update.connected)

    @classmethod
    def from_peer(cls, peer: str, connected: bool) -> ConnectionMessage:
        """The message for our engine's `connection(peer, connected)` callback."""
        return cls(node_id=NodeId(peer), connected=connected)
