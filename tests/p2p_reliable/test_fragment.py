"""Compression, fragmentation and the end-to-end digest."""

from __future__ import annotations

import os

import pytest
import xxhash
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from p2p_reliable.envelope import Flags
from p2p_reliable.fragment import MessageCodec, MessageTooLarge, ReassemblyError


def _codec(**kw: int) -> MessageCodec:
    args = {
        "max_fragment_payload": 1000,
        "max_message_size": 1 << 20,
        "compress_threshold": 2000,
    }
    args.update(kw)
    return MessageCodec(**args)


@given(st.binary(max_size=20_000) | st.builds(lambda n: b"ab" * n, st.integers(0, 20_000)))
def test_split_join_round_trip(payload: bytes) -> None:
    codec = _codec()
    split = codec.split(payload)
    assert all(len(p) <= 1000 for p in split.pieces)
    assert codec.join(split.pieces, split.flags) == payload


def test_compression_only_when_it_pays() -> None:
    codec = _codec()
    assert _codec().split(b"x" * 50_000).flags & Flags.COMPRESSED
    assert not codec.split(os.urandom(50_000)).flags & Flags.COMPRESSED
    assert not codec.split(b"x" * 1000).flags & Flags.COMPRESSED  # under the threshold


def test_64_mib_message() -> None:
    codec = MessageCodec(
        max_fragment_payload=512 * 1024, max_message_size=128 << 20, compress_threshold=16384
    )
    payload = os.urandom(64 << 20)
    split = codec.split(payload)
    assert len(split.pieces) == 129  # 64 MiB + 8-byte digest in 512 KiB pieces
    assert codec.join(split.pieces, split.flags) == payload


def test_too_large_is_refused_at_the_sender() -> None:
    with pytest.raises(MessageTooLarge):
        _codec(max_message_size=100).split(b"x" * 101)


def test_damage_after_envelope_checks_is_still_caught() -> None:
    codec = _codec()
    split = codec.split(b"hello world" * 100)
    pieces = list(split.pieces)
    pieces[0] = b"H" + pieces[0][1:]
    with pytest.raises(ReassemblyError, match="digest mismatch"):
        codec.join(pieces, split.flags)
    with pytest.raises(ReassemblyError, match="shorter than its digest"):
        codec.join([b"abc"], Flags.NONE)


def test_decompression_bomb_is_refused() -> None:
    codec = _codec(max_message_size=10_000)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 1_000_000)
    body = bomb + xxhash.xxh3_64_digest(b"\0" * 1_000_000)
    with pytest.raises(ReassemblyError, match="declares"):
        codec.join([body], Flags.COMPRESSED)
    with pytest.raises(ReassemblyError, match="not a zstd frame"):
        codec.join([b"garbage!" + b"\0" * 8], Flags.COMPRESSED)
