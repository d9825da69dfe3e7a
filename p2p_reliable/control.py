"""Payloads of the control envelopes (ACK, NACK, GAP, HEARTBEAT, SYNC) and their strict parsers."""

from __future__ import annotations

from typing import Any

import attrs
import msgpack

from .envelope import MAX_FRAGMENTS, MAX_SEQ, MAX_STREAM_LEN, DecodeError, Flags, packb
from .rangeset import RangeSet

MAX_RANGES = 64
MAX_HEARTBEAT_STREAMS = 256
MAX_EVICTION_MARKS = 32  # bounds a SYNC to well under 1 KiB
_U64 = 1 << 64
_MAX_MARK = MAX_SEQ + MAX_FRAGMENTS + 1  # the largest range end a valid stream produces


@attrs.frozen
class AckInfo:
    """Everything below `floor` is settled (delivered or given up); `ranges` arrived above it."""

    floor: int
    ranges: RangeSet
    ack_delay: float  # seconds the receiver held the ack back; subtracted from RTT samples
    limit: int  # flow control: the publisher may send sequence numbers below this
    # Whether the first copy that arrived of the largest sequence number was its original
    # transmission (not one flagged AGAIN); None from a receiver that does not say.
    original: bool | None = None


@attrs.frozen
class StreamMark:
    """A publisher's high-water mark for one stream, carried in heartbeats."""

    stream: str
    flags: Flags
    epoch: int
    next_seq: int
    limit: int  # the flow-control limit the publisher holds for the heartbeat's recipient


@attrs.frozen
class EvictionMark:
    """A run of messages that fell out of a publisher's retention, from `seq` to the next mark.

    `age_us`: microseconds between the newest publication in the run and the SYNC's encoding.
    """

    seq: int
    age_us: int


@attrs.frozen
class SyncInfo:
    """The payload of a SYNC, whose envelope seq is the oldest message the publisher holds."""

    next_seq: int  # the publisher's high-water mark: the receiver can NACK up to it at once
    marks: tuple[EvictionMark, ...]  # runs below the envelope's seq, oldest first


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, max_map_len=0, max_ext_len=0)
    except Exception as exc:
        raise DecodeError(f"malformed {what}: {type(exc).__name__}") from None


def _u64(value: Any, what: str, limit: int = _U64 - 1) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise DecodeError(f"{what} is not an integer in [0, {limit}]")
    return value


def _ranges_to_wire(ranges: RangeSet) -> list[list[int]]:
    # Keep the lowest ranges: they are the oldest holes, the ones that block delivery.
    return [[r.start, r.stop] for r in list(ranges)[:MAX_RANGES]]


def _ranges_from_wire(items: Any, what: str) -> RangeSet:
    if type(items) is not list or len(items) > MAX_RANGES:
        raise DecodeError(f"{what}: bad range list")
    out = RangeSet()
    for item in items:
        if type(item) is not list or len(item) != 2:
            raise DecodeError(f"{what}: bad range")
        start, stop = _u64(item[0], what, _MAX_MARK), _u64(item[1], what, _MAX_MARK)
        if stop <= start:
            raise DecodeError(f"{what}: empty range")
        out.add(start, stop)
    return out


def encode_ack(info: AckInfo) -> bytes:
    """Serialise an ACK payload."""
    delay_us = max(0, min(int(info.ack_delay * 1e6), _U64 - 1))
    fields = [info.floor, _ranges_to_wire(info.ranges), delay_us, info.limit]
    if info.original is not None:
        fields.append(int(info.original))
    return packb(fields)


def decode_ack(data: bytes) -> AckInfo:
    """Parse an ACK payload or raise `DecodeError`."""
    fields = _unpack(data, "ack")
    if type(fields) is not list or len(fields) not in (4, 5):
        raise DecodeError("ack: expected 4 or 5 fields")
    floor = _u64(fields[0], "ack floor", _MAX_MARK)
    ranges = _ranges_from_wire(fields[1], "ack")
    delay = _u64(fields[2], "ack delay") / 1e6
    limit = _u64(fields[3], "ack limit", _U64 - 1)
    original = None
    if len(fields) == 5:
        if type(fields[4]) is not int or fields[4] not in (0, 1):
            raise DecodeError("ack: the original flag must be 0 or 1")
        original = fields[4] == 1
    return AckInfo(floor=floor, ranges=ranges, ack_delay=delay, limit=limit, original=original)


def encode_ranges(ranges: RangeSet) -> bytes:
    """Serialise the payload of a NACK or GAP: a list of ranges."""
    return packb(_ranges_to_wire(ranges))


def decode_ranges(data: bytes) -> RangeSet:
    """Parse a NACK or GAP payload or raise `DecodeError`."""
    ranges = _ranges_from_wire(_unpack(data, "ranges"), "ranges")
    if not ranges:
        raise DecodeError("ranges: empty")
    return ranges


def encode_heartbeat(marks: list[StreamMark]) -> bytes:
    """Serialise a HEARTBEAT payload."""
    return packb(
        [
            [m.stream, int(m.flags), m.epoch, m.next_seq, m.limit]
            for m in marks[:MAX_HEARTBEAT_STREAMS]
        ]
    )


def decode_heartbeat(data: bytes) -> list[StreamMark]:
    """Parse a HEARTBEAT payload or raise `DecodeError`."""
    items = _unpack(data, "heartbeat")
    if type(items) is not list or len(items) > MAX_HEARTBEAT_STREAMS:
        raise DecodeError("heartbeat: bad mark list")
    marks = []
    for item in items:
        if type(item) is not list or len(item) != 5:
            raise DecodeError("heartbeat: bad mark")
        stream, flags = item[0], item[1]
        if type(stream) is not str or len(stream) > MAX_STREAM_LEN:
            raise DecodeError("heartbeat: bad stream name")
        if type(flags) is not int or flags not in (0, int(Flags.DIRECT)):
            raise DecodeError("heartbeat: bad flags")
        marks.append(
            StreamMark(
                stream=stream,
                flags=Flags(flags),
                epoch=_u64(item[2], "heartbeat epoch"),
                next_seq=_u64(item[3], "heartbeat seq", _MAX_MARK),
                limit=_u64(item[4], "heartbeat limit"),
            )
        )
    return marks


def encode_sync(info: SyncInfo) -> bytes:
    """Serialise a SYNC payload: [next_seq, [[seq, age_us], ...]]."""
    # EvictionHistory keeps at most MAX_EVICTION_MARKS: nothing to cut here.
    return packb([info.next_seq, [[m.seq, min(m.age_us, _U64 - 1)] for m in info.marks]])


def decode_sync(data: bytes, floor: int) -> SyncInfo | None:
    """Parse the payload of a SYNC for `floor` (its envelope seq) or raise `DecodeError`.

    An empty payload is a SYNC without history (the floor is where the receiver's part of the
    stream starts): None.
    """
    if not data:
        return None
    fields = _unpack(data, "sync")
    if type(fields) is not list or len(fields) != 2:
        raise DecodeError("sync: expected 2 fields")
    next_seq = _u64(fields[0], "sync next seq", _MAX_MARK)
    if next_seq < floor:
        raise DecodeError("sync: next seq below the floor")
    items = fields[1]
    if type(items) is not list or len(items) > MAX_EVICTION_MARKS:
        raise DecodeError("sync: bad mark list")
    marks: list[EvictionMark] = []
    for item in items:
        if type(item) is not list or len(item) != 2:
            raise DecodeError("sync: bad mark")
        mark = EvictionMark(_u64(item[0], "sync mark seq", _MAX_MARK), _u64(item[1], "sync age"))
        if mark.seq >= floor:
            raise DecodeError("sync: mark at or above the floor")
        # Runs go up in seq and down in age (newer publications): anything else is forged.
        if marks and (mark.seq <= marks[-1].seq or mark.age_us > marks[-1].age_us):
            raise DecodeError("sync: marks out of order")
        marks.append(mark)
    return SyncInfo(next_seq=next_seq, marks=tuple(marks))
