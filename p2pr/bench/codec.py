"""Micro-benchmarks of the protocol core; each prints a table and JSON, asserts nothing."""

from __future__ import annotations

import os
import time
from typing import Any

from p2p_reliable.envelope import Envelope, Kind, checksum, decode, encode

from .repeats import DEFAULT_REPEATS, run_interleaved, summarize

# A realistic header: a libp2p peer id as origin, an exo topic name, a millisecond epoch.
_ORIGIN = "12D3KooWGzBxq6pJk2Yx3bV5qzfs4s9kbc6HhQ9d3w4m1pLr8vTe"


# Medians over the rounds, each with a `_spread`.
FIGURES = (
    "encode_decode_us_per_1kib",
    "encode_us_per_1kib",
    "decode_us_per_1kib",
    "checksum_gb_per_s",
)


def bench_codec(
    messages: int = 50_000, checksum_rounds: int = 500, repeats: int = DEFAULT_REPEATS
) -> dict[str, Any]:
    """`repeats` rounds of `measure_codec`: the median and spread of each figure."""
    [samples] = run_interleaved(
        ["codec"], repeats, lambda _config, _round: measure_codec(messages, checksum_rounds)
    )
    return {**summarize(samples, FIGURES, digits=3), "repeats": repeats}


def measure_codec(messages: int, checksum_rounds: int) -> dict[str, float]:
    """Time encode+checksum+decode of 1 KiB messages and xxh3-64 throughput on 1 MiB."""
    env = Envelope(
        kind=Kind.DATA,
        origin=_ORIGIN,
        stream="global_events",
        epoch=1_764_000_000_000,
        seq=123_456,
        payload=os.urandom(1024),
    )
    for _ in range(1000):  # warm caches and the allocator
        decode(encode(env))
    start = time.perf_counter()
    for _ in range(messages):
        decode(encode(env))
    roundtrip = (time.perf_counter() - start) / messages
    wire = encode(env)
    start = time.perf_counter()
    for _ in range(messages):
        encode(env)
    enc = (time.perf_counter() - start) / messages
    start = time.perf_counter()
    for _ in range(messages):
        decode(wire)
    dec = (time.perf_counter() - start) / messages

    block = os.urandom(1 << 20)
    checksum(block)
    start = time.perf_counter()
    for _ in range(checksum_rounds):
        checksum(block)
    gbps = checksum_rounds * len(block) / (time.perf_counter() - start) / 1e9
    return {
        "encode_decode_us_per_1kib": round(roundtrip * 1e6, 3),
        "encode_us_per_1kib": round(enc * 1e6, 3),
        "decode_us_per_1kib": round(dec * 1e6, 3),
        "wire_bytes_per_1kib": len(wire),
        "checksum_gb_per_s": round(gbps, 2),
        "messages": messages,
    }
