"""The wire format: a versioned, checksummed envelope around every protocol message.

Layout of one encoded envelope::

    b"PR" | version (1 byte) | msgpack header+payload array | xxh3-64 of everything before (8 bytes)

The checksum covers the exact bytes that travel, so any flipped bit anywhere is caught before a
single field is trusted. Several envelopes for one destination may travel together in a batch
frame (`b"PB"` + a msgpack array of encoded envelopes) because py-libp2p's cost is per message,
not per byte.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import attrs
import msgpack
import xxhash

MAGIC = b"PR"
AUTH_MAGIC = b"PA"  # an envelope carrying a cluster tag
BATCH_MAGIC = b"PB"
TAG_LEN = 16
VERSION = 1

MAX_ORIGIN_LEN = 128
MAX_STREAM_LEN = 256
MAX_FRAGMENTS = 1 << 20
MAX_BATCH = 4096
_U64 = 1 << 64
# Sequence numbers stay below 2**63 so that every range end, floor and high-water mark
# derived from them (seq + fragment count) still fits the u64 wire fields.
MAX_SEQ = (1 << 63) - 1
_HEAD = MAGIC + bytes([VERSION])
_AUTH_HEAD = AUTH_MAGIC + bytes([VERSION])
_TRAILER = 8
_FIELDS = 9


class Kind(enum.IntEnum):
    """What an envelope carries."""

    DATA = 1  # a whole application message
    FRAGMENT = 2  # one piece of a message spread over consecutive sequence numbers
    ACK = 3  # receiver -> publisher: what arrived (cumulative floor + selective ranges)
    NACK = 4  # receiver -> publisher: these sequence numbers are missing
    HEARTBEAT = 5  # liveness, plus the publisher's high-water marks for tail-loss detection
    SYNC = 6  # publisher -> receiver: "for you this stream starts at seq N"
    GAP = 7  # publisher -> receiver: "I can no longer repair these sequence numbers"


class Flags(enum.IntFlag):
    """Per-envelope bits."""

    NONE = 0
    COMPRESSED = 1  # the message body is zstd (set on every fragment of that message)
    DIRECT = 2  # a point-to-point stream rather than a topic
    # A copy sent again (a repair, probe or redundant copy): the receiver's ack says whether
    # the first copy it got of its largest sequence number was the original, so that the
    # publisher keeps RTT samples (and sees its spurious retransmissions) despite them.
    AGAIN = 4


_KNOWN_FLAGS = int(Flags.COMPRESSED | Flags.DIRECT | Flags.AGAIN)
# Where the flags byte sits in an encoded envelope: after the magic, the version, the
# header array's one-byte length (its 9 fields) and the kind (a one-byte fixint).
_FLAGS_AT = 5
_FIXARRAY_9 = 0x99
_KINDS = {int(k): k for k in Kind}


class DecodeError(ValueError):
    """Raised by `decode` for any input that is not a valid envelope; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChecksumError(DecodeError):
    """The bytes were damaged in transit (or forged without the checksum)."""


class AuthError(DecodeError):
    """The envelope does not carry this cluster's tag: it comes from outside the cluster."""


@attrs.frozen
class Envelope:
    """One protocol message, as it travels."""

    kind: Kind
    origin: str
    stream: str
    epoch: int
    seq: int
    payload: bytes = b""
    frag_index: int = 0
    frag_count: int = 1
    flags: Flags = Flags.NONE

    @property
    def direct(self) -> bool:
        """True for point-to-point streams."""
        return bool(self.flags & Flags.DIRECT)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of `data` (xxHash's C implementation)."""
    return xxhash.xxh3_64_intdigest(data)


def encode(env: Envelope) -> bytes:
    """Serialise an envelope and append its checksum."""
    data = _HEAD + packb(_fields(env))
    return data + xxhash.xxh3_64_digest(data)


def _fields(env: Envelope) -> list[object]:
    return [
        int(env.kind),
        int(env.flags),
        env.origin,
        env.stream,
        env.epoch,
        env.seq,
        env.frag_index,
        env.frag_count,
        env.payload,
    ]


def decode(data: object) -> Envelope:
    """Parse and verify one envelope; raise `DecodeError` (only) for any bad input."""
    raw = _checked(data, 0)
    if raw[:2] == AUTH_MAGIC:
        raise AuthError("envelope carries a cluster tag but no cluster secret is configured")
    return _parse(raw, 0)


def _checked(data: object, tag_len: int) -> bytes:
    """The bytes, once magic, version and checksum are right."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < len(_HEAD) + 1 + _TRAILER + tag_len:
        raise DecodeError(f"truncated: {len(raw)} bytes")
    if raw[:2] not in (MAGIC, AUTH_MAGIC):
        raise DecodeError("bad magic")
    if raw[2] != VERSION:
        raise DecodeError(f"unsupported version {raw[2]}")
    if xxhash.xxh3_64_digest(memoryview(raw)[:-_TRAILER]) != raw[-_TRAILER:]:
        raise ChecksumError("checksum mismatch")
    return raw


def _parse(raw: bytes, tag_len: int) -> Envelope:
    try:
        fields = msgpack.unpackb(
            memoryview(raw)[len(_HEAD) : -_TRAILER - tag_len],
            raw=False,
            use_list=True,
            max_array_len=_FIELDS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types; all mean "malformed"
        raise DecodeError(f"malformed body: {type(exc).__name__}") from None
    return _build(fields)


def _build(fields: Any) -> Envelope:
    if type(fields) is not list or len(fields) != _FIELDS:
        raise DecodeError("body is not a 9-field array")
    kind, flags, origin, stream, epoch, seq, frag_index, frag_count, payload = fields
    for name, value in (
        ("kind", kind),
        ("flags", flags),
        ("epoch", epoch),
        ("seq", seq),
        ("frag_index", frag_index),
        ("frag_count", frag_count),
    ):
        if type(value) is not int or not 0 <= value < _U64:
            raise DecodeError(f"{name} is not a 64-bit unsigned integer")
    if seq > MAX_SEQ:
        raise DecodeError(f"seq {seq} beyond the sequence space")
    if kind not in _KINDS:
        raise DecodeError(f"unknown kind {kind}")
    if flags & ~_KNOWN_FLAGS:
        raise DecodeError(f"unknown flags {flags:#x}")
    if type(origin) is not str or not 0 < len(origin) <= MAX_ORIGIN_LEN:
        raise DecodeError("bad origin")
    if type(stream) is not str or len(stream) > MAX_STREAM_LEN:
        raise DecodeError("bad stream name")
    if type(payload) is not bytes:
        raise DecodeError("payload is not bytes")
    if not 1 <= frag_count <= MAX_FRAGMENTS or frag_index >= frag_count:
        raise DecodeError(f"bad fragment {frag_index}/{frag_count}")
    if kind != Kind.FRAGMENT and frag_count != 1:
        raise DecodeError("only FRAGMENT envelopes may have several fragments")
    return Envelope(
        kind=_KINDS[kind],
        origin=origin,
        stream=stream,
        epoch=epoch,
        seq=seq,
        payload=payload,
        frag_index=frag_index,
        frag_count=frag_count,
        flags=Flags(flags),
    )


class EnvelopeCodec:
    """Encoding and decoding for one cluster: with a secret, every envelope carries a keyed
    BLAKE2b tag, and envelopes without this cluster's tag are refused (`AuthError`).

    Layout with a secret: `b"PA" | version | body | tag (16) | xxh3-64 of all before`. The
    checksum covers the tag too, so damage is reported as damage, never as an intruder.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self.key = (
            hashlib.blake2b(secret, digest_size=32, person=b"p2pr-cluster").digest()
            if secret
            else None
        )

    def encode(self, env: Envelope) -> bytes:
        """Serialise `env` (with this cluster's tag when there is a secret)."""
        if self.key is None:
            return encode(env)
        data = _AUTH_HEAD + packb(_fields(env))
        data += hashlib.blake2b(data, key=self.key, digest_size=TAG_LEN).digest()
        return data + xxhash.xxh3_64_digest(data)

    def mark_again(self, data: bytes) -> bytes:
        """The encoded envelope `data` (of this codec), flagged as sent again (Flags.AGAIN).

        The flag is set in place, in a copy, and the tag and checksum made anew: no decoding
        and re-encoding of a payload that may be large.
        """
        if data[_FLAGS_AT - 2] != _FIXARRAY_9 or max(data[_FLAGS_AT - 1 : _FLAGS_AT + 1]) >= 0x80:
            raise ValueError("not an envelope of this codec")  # the layout changed: a bug
        tag_len = 0 if self.key is None else TAG_LEN
        body = bytearray(memoryview(data)[: len(data) - _TRAILER - tag_len])
        body[_FLAGS_AT] |= int(Flags.AGAIN)
        if self.key is not None:
            body += hashlib.blake2b(body, key=self.key, digest_size=TAG_LEN).digest()
        body += xxhash.xxh3_64_digest(body)
        return bytes(body)

    def decode(self, data: object) -> Envelope:
        """Parse and verify; raise `DecodeError` (`AuthError` for foreign envelopes)."""
        if self.key is None:
            return decode(data)
        if isinstance(data, bytes | bytearray | memoryview) and bytes(data[:2]) == MAGIC:
            _checked(data, 0)  # damaged bytes are reported as damage, not as an intruder
            raise AuthError("envelope without a cluster tag")
        raw = _checked(data, TAG_LEN)
        body_end = len(raw) - _TRAILER - TAG_LEN
        tag = hashlib.blake2b(raw[:body_end], key=self.key, digest_size=TAG_LEN).digest()
        if not hmac.compare_digest(tag, raw[body_end : body_end + TAG_LEN]):
            raise AuthError("cluster tag mismatch (another cluster, or a wrong secret)")
        return _parse(raw, TAG_LEN)


def encode_batch(envelopes: Sequence[bytes]) -> bytes:
    """Join already-encoded envelopes into one frame (one is sent as it is)."""
    if len(envelopes) == 1:
        return envelopes[0]
    return BATCH_MAGIC + packb(list(envelopes))


def decode_batch(data: object) -> list[bytes]:
    """Split a frame into encoded envelopes; a plain envelope is a batch of one.

    Each returned item still has to pass `decode`: a batch frame has no checksum of its own
    because every envelope inside carries one.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if raw[:2] != BATCH_MAGIC:
        return [raw]
    try:
        items = msgpack.unpackb(
            memoryview(raw)[2:], raw=False, max_array_len=MAX_BATCH, max_map_len=0, max_ext_len=0
        )
    except Exception as exc:
        raise DecodeError(f"malformed batch: {type(exc).__name__}") from None
    if type(items) is not list or not all(type(i) is bytes for i in items):
        raise DecodeError("batch is not an array of byte strings")
    return items


def packb(obj: object) -> bytes:
    """msgpack with bin types, typed (msgpack itself returns Any)."""
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out
