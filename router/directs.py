"""Direct streams: one long-lived libp2p stream per peer and direction carries frames.

Writing: frames for a peer queue in its `_PeerLink`; one writer task per peer coalesces them
and writes pieces of one yamux frame and one Noise message each (py-libp2p's cost is per
frame and per message, not per byte).

Reading: frames are varint-prefixed and cut from a buffer of what the stream delivered. What
a peer can make this node hold is bounded: `streams_per_peer` inbound direct streams at once,
frames of at most `max_frame` bytes (announcing more ends the stream at once, before any of
the body is read), `unfinished_per_peer` bytes of unfinished frames over all its streams, and
timeouts for a stream that sends nothing (`idle_timeout`; honest peers heartbeat every
100 ms) and for an unfinished frame that stops growing (`frame_timeout`). Every refusal is
counted against the peer; the node keeps running.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_uvarint

log = logging.getLogger("p2pr.engine")

DIRECT_PROTOCOL = TProtocol("/p2pr/direct/1.0.0")

# py-libp2p's cost on a stream is per call, not per byte: every yamux frame is at least one
# Noise message (credit goes back per 64 KiB read: router/yamux_credit.py). A yamux frame
# carries up to 65524 bytes, a Noise message 65519 of plaintext, so a full frame becomes two
# Noise messages (the second one 17 bytes). Writes of at most WRITE_CHUNK bytes make one
# frame, one message.
try:
    from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as _NOISE_PLAINTEXT
    from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as _YAMUX_HEADER
except ImportError:  # pragma: no cover - other py-libp2p layouts
    _NOISE_PLAINTEXT, _YAMUX_HEADER = 65535 - 16, 12
WRITE_CHUNK = _NOISE_PLAINTEXT - _YAMUX_HEADER
# Reads take whatever the stream holds, up to this much, and frames are cut from our buffer.
READ_CHUNK = 4 * 1024 * 1024


@attrs.frozen
class DirectLimits:
    """What one peer may make this node hold on its direct streams."""

    streams_per_peer: int = 4
    unfinished_per_peer: int = 4 * 1024 * 1024
    idle_timeout: float = 30.0
    frame_timeout: float = 10.0
    queue_frames: int = 4096  # frames waiting to be written to one peer; beyond: dropped


@attrs.define
class DirectStats:
    """Transport counters of the direct streams."""

    frames_sent: int = 0
    bytes_sent: int = 0
    queue_drops: int = 0
    stream_errors: int = 0
    oversized_frames: int = 0
    streams_refused: int = 0
    timeouts: int = 0


@attrs.define
class _PeerLink:
    queue: deque[bytes] = attrs.Factory(deque)
    queued_bytes: int = 0
    wake: trio.Event = attrs.Factory(trio.Event)
    running: bool = False


class FrameTooLarge(ValueError):
    """A direct-stream frame announced more bytes than any valid frame has."""


class DirectTransport:
    """Writers and readers of the direct streams of one engine (its trio loop only)."""

    def __init__(
        self,
        limits: DirectLimits,
        max_frame: int,
        receive: Callable[[bytes, str, float], None],
        drained: Callable[[str], None],
        reject: Callable[[str, str], None],
    ) -> None:
        self.limits = limits
        self.max_frame = max_frame
        self._receive = receive
        self._drained = drained
        self._reject = reject
        self.stats = DirectStats()
        self._links: dict[str, _PeerLink] = {}
        self._inbound: dict[str, int] = {}
        self._unfinished: dict[str, int] = {}
        self._host: IHost | None = None
        self._nursery: trio.Nursery | None = None

    def start(self, host: IHost, nursery: trio.Nursery) -> None:
        """Serve inbound direct streams; writers run in `nursery`."""
        self._host, self._nursery = host, nursery
        host.set_stream_handler(DIRECT_PROTOCOL, self._on_stream)

    # -- writing ---------------------------------------------------------------------------

    def queue(self, peer: str, data: bytes) -> None:
        """Send `data` (one frame) to `peer` as soon as its stream takes it."""
        link = self._links.setdefault(peer, _PeerLink())
        if len(link.queue) >= self.limits.queue_frames:
            # The stream is stuck or the peer gone: the protocol retransmits what matters.
            self.stats.queue_drops += 1
            return
        link.queue.append(data)
        link.queued_bytes += len(data)
        link.wake.set()
        if not link.running:
            link.running = start_soon(self._nursery, self._writer, peer, link)

    def backlog(self, peer: str) -> int:
        """Bytes waiting for `peer`'s stream."""
        link = self._links.get(peer)
        return link.queued_bytes if link is not None else 0

    def max_backlog(self) -> int:
        """The longest wait of any peer's stream, in bytes."""
        return max((link.queued_bytes for link in self._links.values()), default=0)

    def idle(self) -> bool:
        """Nothing waits to be written."""
        return not any(link.queue for link in self._links.values())

    def forget(self, peer: str) -> None:
        """`peer` is gone: drop its link once its writer has stopped."""
        link = self._links.get(peer)
        if link is not None and not link.running:
            del self._links[peer]

    async def _writer(self, peer: str, link: _PeerLink) -> None:
        assert self._host is not None
        stream: INetStream | None = None
        try:
            while True:
                while not link.queue:
                    link.wake = trio.Event()
                    await link.wake.wait()
                if stream is None:
                    stream = await self._host.new_stream(ID.from_base58(peer), [DIRECT_PROTOCOL])
                # Coalesce whatever is queued, then write it in pieces of one yamux frame and
                # one Noise message each.
                frames = _take(link.queue, 64)
                for piece in _pieces(frames, WRITE_CHUNK):
                    await stream.write(piece)
                written = sum(len(f) for f in frames)
                link.queued_bytes -= written
                self.stats.frames_sent += len(frames)
                self.stats.bytes_sent += written
                self._drained(peer)
        except Exception as exc:
            self.stats.stream_errors += 1
            self.stats.queue_drops += len(link.queue)
            link.queue.clear()
            link.queued_bytes = 0
            log.info("direct stream to %s ended: %s", peer, exc)
        finally:
            link.running = False
            if stream is not None:
                with trio.move_on_after(1):
                    await stream.reset()

    # -- reading ---------------------------------------------------------------------------

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if self._inbound.get(peer, 0) >= self.limits.streams_per_peer:
            self.stats.streams_refused += 1
            self._reject(peer, "too many direct streams")
            await _reset(stream)
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        held = 0
        try:
            held = await self._read(peer, stream)
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]
            self._unfinish(peer, -held)

    async def _read(self, peer: str, stream: INetStream) -> int:
        """Deliver the frames of `stream` until it ends or breaks a limit; the bytes of an
        unfinished frame still held (counted in _unfinished) when it does."""
        buffer = bytearray()
        held = 0
        try:
            while True:
                wait = self.limits.frame_timeout if buffer else self.limits.idle_timeout
                with trio.move_on_after(wait) as scope:
                    chunk = await stream.read(READ_CHUNK)
                if scope.cancelled_caught:
                    self.stats.timeouts += 1
                    kind = "unfinished frame timed out" if buffer else "idle direct stream"
                    self._reject(peer, kind)
                    await _reset(stream)
                    return held
                if not chunk:
                    return held
                # The frames of one read wait for those before them: their acks say so.
                arrived = trio.current_time()
                buffer += chunk
                # One read usually brings several frames (or the rest of a large one).
                used = 0
                while (frame := _cut_frame(buffer, used, self.max_frame)) is not None:
                    data, used = frame
                    self._receive(data, peer, arrived)
                if used:
                    del buffer[:used]
                self._unfinish(peer, len(buffer) - held)
                held = len(buffer)
                if self._unfinished.get(peer, 0) > self.limits.unfinished_per_peer:
                    self._reject(peer, "too many unfinished bytes")
                    await _reset(stream)
                    return held
        except ValueError as exc:  # FrameTooLarge, or a varint beyond 64 bits
            self.stats.oversized_frames += 1
            self._reject(peer, "oversized frame")
            log.debug("direct stream from %s: %s", peer, exc)
            await _reset(stream)
        except Exception as exc:
            log.debug("direct stream from %s closed: %s", peer, exc)
        return held

    def _unfinish(self, peer: str, delta: int) -> None:
        total = self._unfinished.get(peer, 0) + delta
        if total > 0:
            self._unfinished[peer] = total
        else:
            self._unfinished.pop(peer, None)


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:
            pass


def _take(queue: deque[bytes], n: int) -> list[bytes]:
    return [queue.popleft() for _ in range(min(n, len(queue)))]


def _pieces(frames: list[bytes], size: int) -> Iterator[bytes]:
    """The varint-prefixed frames back to back, cut into pieces of at most `size` bytes.

    Every byte is copied once, into its piece: no joined buffer of all the frames (megabytes,
    a fresh allocation each time) is built first.
    """
    parts: list[memoryview] = []
    room = size
    for frame in frames:
        for part in (encode_uvarint(len(frame)), frame):
            view = memoryview(part)
            while view:
                take = view[:room]
                parts.append(take)
                room -= len(take)
                view = view[len(take) :]
                if not room:
                    yield b"".join(parts)
                    parts, room = [], size
    if parts:
        yield b"".join(parts)


def _cut_frame(buffer: bytearray, pos: int, limit: int) -> tuple[bytes, int] | None:
    """The varint-prefixed frame at `pos` and the position after it, or None if incomplete.

    Raises FrameTooLarge (or ValueError for a varint over 64 bits) as soon as the prefix
    says so, before any of the body is awaited.
    """
    length = 0
    shift = 0
    index = pos
    end = len(buffer)
    while True:
        if index >= end:
            return None
        byte = buffer[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 64:
            raise ValueError("varint frame length over 64 bits")
    if length > limit:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {limit}")
    stop = index + length
    if stop > end:
        return None
    with memoryview(buffer) as view, view[index:stop] as body:
        return bytes(body), stop


def start_soon(nursery: trio.Nursery | None, fn: Callable[..., Any], *args: Any) -> bool:
    """Start `fn(*args)` in `nursery` unless it is gone or closing (the engine is shutting
    down: connections closing then must not start new work, nor fail loudly)."""
    if nursery is None:
        return False
    try:
        nursery.start_soon(fn, *args)
    except RuntimeError:  # "Nursery is closed to new arrivals"
        return False
    return True
