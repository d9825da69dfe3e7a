"""Dialing an address whose peer id is not known: `/ip4/10.0.0.2/tcp/4001`.

exo's own networking took bootstrap addresses without `/p2p/<id>`; py-libp2p's dial needs
the id, because the initiator of a Noise handshake checks the key it meets against it.
Noise itself works without an expected id (the initiator learns the responder's key in the
handshake), so for such an address the connection is built here step by step: TCP (and the
private-network wrapper when the swarm has a PSK), Noise without an expected peer, the
muxer, then the swarm adopts the connection as if it had dialed it. The peer id comes out of
the handshake, authenticated, and the dial planner remembers it for that address.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.security.pnet.protector import new_protected_conn

from .dialplan import DialPlanner, PeerAddressError
from .directs import start_soon

log = logging.getLogger("p2pr.dialer")


class PeerIdUnknownError(Exception):
    """The address could not be reached, or the handshake at it failed."""


async def dial_unknown_peer(host: IHost, addr: multiaddr.Multiaddr) -> ID:
    """Connect to whoever listens at `addr`; return its (authenticated) peer id.

    Raises PeerIdUnknownError when no transport can dial it or any step fails.
    """
    swarm: Any = host.get_network()
    transport = swarm.transport_manager.transport_for_dialing(addr)
    if transport is None:
        raise PeerIdUnknownError(f"no transport can dial {addr}")
    try:
        raw = await transport.dial(addr)
    except Exception as exc:
        raise PeerIdUnknownError(f"{addr}: {exc}") from None
    secured = None
    try:
        if swarm.psk is not None:
            raw = new_protected_conn(raw, swarm.psk)
        secured = await swarm.upgrader.security_multistream.secure_outbound(raw, None)
        peer: ID = secured.get_remote_peer()
        if peer == host.get_id():
            raise PeerIdUnknownError(f"{addr} is this node itself")
        muxed = await swarm.upgrader.upgrade_connection(secured, peer)
        host.get_peerstore().add_addrs(peer, [addr], 3600)
        await swarm.add_conn(muxed, direction="outbound")
        return peer
    except BaseException as exc:
        closable = secured if secured is not None else raw
        try:
            await closable.close()
        except Exception:
            pass
        if isinstance(exc, PeerIdUnknownError):
            raise
        if not isinstance(exc, Exception):
            raise
        raise PeerIdUnknownError(f"{addr}: handshake failed: {exc}") from None


class Dialer:
    """Dials the known addresses of peers that are not connected, when the DialPlanner says.

    Addresses come from configuration (bootstrap, static), mDNS and peer exchange. A failed
    address is retried with backoff (forgotten after a few failures unless configured).
    """

    def __init__(
        self,
        node_id: str,
        redial_interval: float,
        connected: Callable[[], Collection[str]],
        dial_timeout: float = 5.0,
    ) -> None:
        self.planner = DialPlanner(self_id=node_id)
        self.redial_interval = redial_interval
        self.dial_timeout = dial_timeout
        self._connected = connected
        self._wake = trio.Event()
        self._host: IHost | None = None
        self._nursery: trio.Nursery | None = None

    def add(self, addr: str, source: str) -> None:
        """Learn an address (engine loop only). A malformed one is logged and ignored: one
        bad entry must not stop a node that has others."""
        try:
            if self.planner.add(addr, source, trio.current_time()):
                self._wake.set()
        except PeerAddressError as exc:
            log.error("ignoring peer address from %s: %s", source, exc)

    def on_disconnected(self, peer: str) -> None:
        """`peer` went away: dial it again soon."""
        self.planner.on_disconnected(peer, trio.current_time())
        self._wake.set()

    async def run(self, host: IHost, nursery: trio.Nursery) -> None:
        """Dial what is due, until cancelled."""
        self._host, self._nursery = host, nursery
        while True:
            now = trio.current_time()
            connected = self._connected()
            for state in self.planner.due(now, connected):
                start_soon(nursery, self._dial, state.addr, state.peer)
            # next_time must skip connected peers as due() does, or this loop never sleeps.
            planned = self.planner.next_time(connected)
            wake_at = max(now + 0.01, min(planned or math.inf, now + self.redial_interval))
            self._wake = trio.Event()
            with trio.move_on_at(wake_at):
                await self._wake.wait()

    async def _dial(self, addr: str, peer: str | None) -> None:
        assert self._host is not None
        maddr = multiaddr.Multiaddr(addr)
        ok = False
        try:
            with trio.fail_after(self.dial_timeout):
                if peer is None:
                    learned = await dial_unknown_peer(self._host, maddr)
                    self.planner.learned(addr, learned.to_base58())
                    log.info("%s is peer %s", addr, learned.to_base58())
                else:
                    # This address alone, once: host.connect would try every address the
                    # peerstore holds for the peer (an exchanged lie adds many), each several
                    # times; the DialPlanner decides about retries.
                    swarm: Any = self._host.get_network()
                    await swarm.dial_addr(maddr, ID.from_base58(peer))
            ok = True
        except (Exception, trio.TooSlowError) as exc:
            log.info("could not reach %s: %s", addr, exc or type(exc).__name__)
        self.planner.on_result(addr, ok, trio.current_time())
        if not ok and addr in self.planner.dropped:
            log.warning("forgot %s: it kept failing (a stale mDNS entry?)", addr)
            if peer is not None and not any(
                s.peer == peer for s in self.planner.addresses.values()
            ):
                self._host.get_peerstore().clear_addrs(ID.from_base58(peer))
        self._wake.set()
