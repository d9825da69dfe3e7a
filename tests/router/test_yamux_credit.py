"""Yamux credit goes back in batches (router.yamux_credit): small messages on a stream cost
no WINDOW_UPDATE frames until a frame's worth (64 KiB) is read, and bulk transfers still get
their credit back and finish. Two real py-libp2p hosts (build_host) over loopback TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE
from multiaddr import Multiaddr

from router.host import build_host
from router.yamux_credit import CREDIT_BATCH

LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTOCOL = TProtocol("/p2pr-test/credit/1")


class _Reader:
    """The receiving end: reads `expect` bytes, counting the WINDOW_UPDATEs its stream sends."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.updates: list[int] = []
        self.done = trio.Event()

    async def handle(self, stream: Any) -> None:
        muxed = stream.muxed_stream
        send_update = muxed.send_window_update

        async def counted(increment: int, skip_lock: bool = False) -> None:
            self.updates.append(increment)
            await send_update(increment, skip_lock)

        muxed.send_window_update = counted
        got = 0
        while got < self.expect:
            got += len(await stream.read(1 << 20))
        self.done.set()


@asynccontextmanager
async def _stream_to(reader: _Reader) -> AsyncIterator[Any]:
    listener = build_host(create_new_key_pair(), LISTEN)
    dialer = build_host(create_new_key_pair(), LISTEN)
    async with listener.run(LISTEN), dialer.run(LISTEN):
        listener.set_stream_handler(PROTOCOL, reader.handle)
        target = info_from_p2p_addr(Multiaddr(f"{listener.get_addrs()[0]}"))
        with trio.fail_after(10):
            await dialer.connect(target)
            stream = await dialer.new_stream(target.peer_id, [PROTOCOL])
        yield stream


async def test_small_messages_send_no_window_update_below_a_frames_worth() -> None:
    size, count = 64, 600  # 38,400 bytes: under the 64 KiB that a credit waits for
    reader = _Reader(size * count)
    async with _stream_to(reader) as stream:
        with trio.fail_after(30):
            for _ in range(count):
                await stream.write(b"x" * size)
                await trio.sleep(0)  # one read per message on the other side, mostly
            await reader.done.wait()
        # py-libp2p 0.8 by itself sent one for about every other read (~300 here).
        assert reader.updates == []
        # (less still: the protocol negotiation's bytes went on the stream too)
        assert stream.muxed_stream.send_window <= DEFAULT_WINDOW_SIZE - size * count


async def test_bulk_data_gets_its_credit_back_a_frame_at_a_time() -> None:
    chunk, total = 16 * 1024, 4 * 1024 * 1024  # 16 times the initial window
    reader = _Reader(total)
    async with _stream_to(reader) as stream:
        with trio.fail_after(60):
            for _ in range(total // chunk):
                await stream.write(b"y" * chunk)  # blocks whenever credit runs out
            await reader.done.wait()
    # Every update returns at least a full frame's worth; together they cover what was read
    # beyond the window the sender started with.
    assert reader.updates
    assert min(reader.updates) >= CREDIT_BATCH
    assert sum(reader.updates) >= total - DEFAULT_WINDOW_SIZE
    assert len(reader.updates) <= total // CREDIT_BATCH
