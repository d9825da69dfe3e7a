"""A node keeps accepting connections however many came and went before (router.host's
free_inbound_slots_on_close: py-libp2p 0.8 kept a slot per inbound connection for the life
of the node, and closed every connection after the 250th before its handshake)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from router.host import _InboundClosed, build_host, free_inbound_slots_on_close

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


class _Muxed:
    def __init__(self) -> None:
        self.event_closed = trio.Event()


class _Swarm:
    """py-libp2p's swarm, reduced to the two calls the wrapper touches (a double beside the
    real-host test above)."""

    def __init__(self) -> None:
        self.muxed = _Muxed()

    async def upgrade_inbound_raw_conn(self, raw_conn: Any, maddr: Any) -> _Muxed:
        return self.muxed

    async def _do_handle_inbound_connection(self, raw_conn: Any, maddr: Any) -> None:
        await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        await trio.sleep_forever()  # py-libp2p's handler: until the swarm ends


async def test_only_the_listener_handler_waits_for_the_close() -> None:
    swarm = _Swarm()
    free_inbound_slots_on_close(swarm)
    # Hole punching and relays upgrade inbound connections too, and want them back at once.
    with trio.fail_after(5):
        assert await swarm.upgrade_inbound_raw_conn(None, LISTEN[0]) is swarm.muxed
    async with trio.open_nursery() as nursery:
        handler_done = trio.Event()

        async def handler() -> None:
            with pytest.raises(_InboundClosed, match=r"127\.0\.0\.1"):
                await swarm._do_handle_inbound_connection(None, LISTEN[0])
            handler_done.set()

        nursery.start_soon(handler)
        await trio.testing.wait_all_tasks_blocked()
        assert not handler_done.is_set()  # the connection is open: the handler holds on
        swarm.muxed.event_closed.set()
        with trio.fail_after(5):
            await handler_done.wait()  # closed: the handler ends, its slot comes back
