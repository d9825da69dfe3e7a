"""The engine's eyes on its peers: hellos exchanged on connect, hung peers found and cut.

`PeerWatch` runs in the engine's trio loop. It sends this node's `Hello` to every peer that
connects (and again to all of them when our subscriptions change), reads theirs, and feeds
both to `Membership`, whose decisions the engine applies. Its liveness loop asks the
`HangDetector` which silent peers to ping, and closes the connections of those that do not
answer, so that a hung peer is reported as disconnected as a killed one is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_uvarint

from .directs import start_soon
from .liveness import HangDetector, LivenessConfig
from .membership import (
    HELLO_PROTOCOL,
    MAX_HELLO_BYTES,
    Hello,
    HelloError,
    Membership,
    MembershipChange,
)
from .ratelog import RateLimitedLog

log = logging.getLogger("p2pr.peers")
HELLO = TProtocol(HELLO_PROTOCOL)
_HELLO_ATTEMPTS = 3
_HELLO_TIMEOUT = 5.0


class PeerWatch:
    """Hello exchange and hung-peer detection for one engine."""

    def __init__(
        self,
        liveness: LivenessConfig,
        own_hello: Callable[[], Hello],
        apply: Callable[[MembershipChange], None],
        liveness_input: Callable[[], tuple[dict[str, float | None], set[str]]],
        reject: Callable[[str, str], None],
    ) -> None:
        self.membership = Membership()
        self.hangs = HangDetector(liveness)
        self._own_hello = own_hello
        self._apply = apply
        self._liveness_input = liveness_input
        self._reject = reject
        self._host: IHost | None = None
        self._nursery: trio.Nursery | None = None
        self._connected: set[str] = set()
        self.bad_hellos = 0
        self.hung_disconnects = 0
        self._log = RateLimitedLog(log)

    def start(self, host: IHost, nursery: trio.Nursery) -> None:
        """Serve hellos and watch liveness in `nursery`."""
        self._host, self._nursery = host, nursery
        host.set_stream_handler(HELLO, self._on_hello_stream)
        nursery.start_soon(self._liveness_loop)

    # -- connections -----------------------------------------------------------------------

    def on_connected(self, peer: str, first: bool) -> None:
        """A connection to `peer` is up (`first`: no other was): say hello on each one, as
        the peer may not have seen the others close yet (a resumed node) and waits for it."""
        if first:
            self._connected.add(peer)
            self._apply(self.membership.on_connected(peer))
        self._spawn(self._send_hello, peer)

    def on_disconnected(self, peer: str) -> None:
        """The last connection to `peer` closed."""
        self._connected.discard(peer)
        self.hangs.probe_done(peer)
        self._apply(self.membership.on_disconnected(peer))

    def hello_changed(self) -> None:
        """Our hello changed (a new subscription): tell every connected peer."""
        for peer in sorted(self._connected):
            self._spawn(self._send_hello, peer)

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        start_soon(self._nursery, fn, *args)

    # -- hellos ----------------------------------------------------------------------------

    async def _send_hello(self, peer: str) -> None:
        assert self._host is not None
        delay = 0.2
        for attempt in range(_HELLO_ATTEMPTS):
            if peer not in self._connected:
                return
            data = self._own_hello().encode()
            try:
                with trio.fail_after(_HELLO_TIMEOUT):
                    stream = await self._host.new_stream(ID.from_base58(peer), [HELLO])
                    try:
                        await stream.write(encode_uvarint(len(data)) + data)
                    finally:
                        await stream.close()
                return
            except (Exception, trio.TooSlowError) as exc:
                self._log.info(
                    peer, "hello", "hello to %s failed (attempt %d): %r", peer, attempt + 1, exc
                )
            await trio.sleep(delay)
            delay *= 2

    async def _on_hello_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            with trio.fail_after(_HELLO_TIMEOUT):
                data = await _read_prefixed(stream, MAX_HELLO_BYTES)
            hello = Hello.decode(data)
        except (HelloError, ValueError, trio.TooSlowError) as exc:
            self.bad_hellos += 1
            self._reject(peer, "bad hello")
            log.debug("bad hello from %s: %s", peer, exc)
            await stream.reset()
            return
        except Exception as exc:
            self._log.info(peer, "hello stream", "hello stream from %s failed: %r", peer, exc)
            return
        await stream.close()
        self._apply(self.membership.on_hello(peer, hello))

    # -- liveness --------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        interval = self.hangs.config.check_interval
        while True:
            await trio.sleep(interval)
            last_heard, dead = self._liveness_input()
            now = trio.current_time()
            for peer in self.hangs.check(now, last_heard, dead):
                self._spawn(self._probe, peer)

    async def _probe(self, peer: str) -> None:
        assert self._host is not None
        timeout = self.hangs.config.probe_timeout
        answered = False
        try:
            with trio.move_on_after(timeout):
                stream = await self._host.new_stream(ID.from_base58(peer), [PING_PROTOCOL])
                try:
                    await perform_ping_roundtrip(stream)
                    answered = True
                finally:
                    with trio.move_on_after(0.5):
                        await stream.close()
        except Exception as exc:
            log.debug("probe of %s failed: %r", peer, exc)
        if answered or peer not in self._connected:
            self.hangs.probe_done(peer)
            return
        self.hung_disconnects += 1
        log.warning(
            "peer %s is hung: no heartbeat for %.1f s and no answer to a ping within %.1f s; "
            "closing its connection",
            peer,
            self.hangs.config.silence,
            timeout,
        )
        with trio.move_on_after(2):
            await self._host.get_network().close_peer(ID.from_base58(peer))
        # Still connected (the close failed or a new connection came): judge afresh later.
        if peer in self._connected:
            self.hangs.probe_done(peer)


async def _read_prefixed(stream: INetStream, limit: int) -> bytes:
    """One varint-prefixed message of at most `limit` bytes (ValueError beyond)."""
    length = 0
    for shift in range(0, 35, 7):
        byte = await stream.read(1)
        if not byte:
            raise ValueError("stream ended inside the length prefix")
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
    else:
        raise ValueError("length prefix too long")
    if length > limit:
        raise ValueError(f"hello of {length} bytes exceeds {limit}")
    data = b""
    while len(data) < length:
        chunk = await stream.read(length - len(data))
        if not chunk:
            raise ValueError("stream ended inside the hello")
        data += chunk
    return data
