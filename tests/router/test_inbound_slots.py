"""A node keeps accepting connections however many came and went before (router.host's
free_inbound_slots_on_close: py-libp2p 0.8 kept a slot per inbound connection for the life
of the node, and closed every connection after the 250th before its handshake)."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from router.host import build_host

LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _slots(host: Any) -> trio.CapacityLimiter:
    limiter: trio.CapacityLimiter = host.get_network()._inbound_limiter
    return limiter


SLOTS = 4  # py-libp2p's 250, made small so that the test needs few connections


async def _all_slots_free(host: Any) -> None:
    """Until the listener has seen the close (a little after the dialer made it); py-libp2p
    signals nothing when a slot comes back, so this looks, within a bound."""
    with trio.fail_after(10):
        while _slots(host).borrowed_tokens:
            await trio.sleep(0.01)


async def test_inbound_slots_come_back_when_connections_close() -> None:
    listener = build_host(create_new_key_pair(), LISTEN)
    listener.get_network()._inbound_limiter = trio.CapacityLimiter(SLOTS)
    async with listener.run(LISTEN):
        target = info_from_p2p_addr(Multiaddr(f"{listener.get_addrs()[0]}"))
        for _ in range(SLOTS + 6):  # more connections, one after the other, than slots
            dialer = build_host(create_new_key_pair(), LISTEN)
            async with dialer.run(LISTEN):
                with trio.fail_after(10):
                    await dialer.connect(target)
                    # (A host that stops leaves its connections to the garbage collector.)
                    await dialer.get_network().close_peer(target.peer_id)
            await _all_slots_free(listener)
        last = build_host(create_new_key_pair(), LISTEN)
        async with last.run(LISTEN):
            with trio.fail_after(10):
                await last.connect(target)
            assert listener.get_network().get_connections(last.get_id())
