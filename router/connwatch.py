"""libp2p's connection notifications, turned into engine calls; and closing a host's listeners.

Also enforces the per-peer stream cap: py-libp2p's stream limit is global, so one peer must
not be able to use it up for everyone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee

__all__ = ["ConnectionWatch", "close_listeners"]

log = logging.getLogger("p2pr.engine")


class ConnectionWatch(INotifee):
    """Calls `connected(peer, address)` and `disconnected(peer)` as connections open and
    close, and resets streams beyond `max_streams_per_peer` (`reject(peer, kind)`)."""

    def __init__(
        self,
        *,
        connected: Callable[[str, str | None], None],
        disconnected: Callable[[str], None],
        reject: Callable[[str, str], None],
        max_streams_per_peer: int,
    ) -> None:
        self._connected = connected
        self._disconnected = disconnected
        self._reject = reject
        self.max_streams_per_peer = max_streams_per_peer

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        # Counted from the connections' own stream sets, so the count cannot drift.
        peer = stream.muxed_conn.peer_id
        streams = sum(len(conn.get_streams()) for conn in network.get_connections(peer))
        if streams > self.max_streams_per_peer:
            self._reject(peer.to_base58(), "too many streams")
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        try:
            address: str | None = str(conn.get_transport_addresses()[0])
        except Exception:
            address = None
        self._connected(conn.muxed_conn.peer_id.to_base58(), address)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._disconnected(conn.muxed_conn.peer_id.to_base58())
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


async def close_listeners(host: IHost) -> None:
    """Close the host's listeners (py-libp2p leaves them to the garbage collector)."""
    network: Any = host.get_network()
    for listener in list(network.listeners.values()):
        try:
            await listener.close()
        except Exception as exc:
            log.debug("closing a listener: %r", exc)
    network.listeners.clear()
