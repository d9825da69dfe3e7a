"""Exact bytes for MLX arrays, with a checksum, and an order-independent tensor fingerprint.

Wire format of `encode_tensor` (all integers little-endian):

    magic b"MT" | version u8 | dtype code u8 | ndim u8 | shape: ndim x u64
    | xxh3-64 of (everything before it + payload) u64 | payload

The payload is the array's elements in C order, bit for bit (bfloat16 travels as its uint16
bit pattern, since numpy has no bfloat16), so a hidden state decodes to exactly the array that
was encoded. Hosts are assumed little-endian (x86-64 and arm64 both are).
"""

from __future__ import annotations

import math
import random
import struct
from functools import reduce

import mlx.core as mx
import numpy as np
import xxhash

__all__ = [
    "TensorDecodeError",
    "combine",
    "damage",
    "decode_tensor",
    "encode_tensor",
    "fingerprint",
    "tensor_bytes",
]

MAGIC = b"MT"
VERSION = 1
_PREFIX = struct.Struct("<2sBBB")
_U64 = struct.Struct("<Q")
_MASK64 = (1 << 64) - 1

# Wire codes are fixed forever; numpy dtypes give the byte layout of each.
_DTYPES: dict[int, tuple[mx.Dtype, np.dtype]] = {
    1: (mx.bool_, np.dtype("?")),
    2: (mx.uint8, np.dtype("<u1")),
    3: (mx.uint16, np.dtype("<u2")),
    4: (mx.uint32, np.dtype("<u4")),
    5: (mx.uint64, np.dtype("<u8")),
    6: (mx.int8, np.dtype("<i1")),
    7: (mx.int16, np.dtype("<i2")),
    8: (mx.int32, np.dtype("<i4")),
    9: (mx.int64, np.dtype("<i8")),
    10: (mx.float16, np.dtype("<f2")),
    11: (mx.bfloat16, np.dtype("<u2")),
    12: (mx.float32, np.dtype("<f4")),
    13: (mx.float64, np.dtype("<f8")),
    14: (mx.complex64, np.dtype("<c8")),
}
_CODES = {mx_dtype: code for code, (mx_dtype, _) in _DTYPES.items()}


class TensorDecodeError(ValueError):
    """Bytes that are not a valid encoded tensor: truncated, unknown format, or corrupted."""


def _dtype_code(dtype: mx.Dtype) -> int:
    try:
        return _CODES[dtype]
    except KeyError:
        raise TypeError(f"tensor dtype {dtype} has no wire encoding") from None


def _host_array(array: mx.array) -> np.ndarray:
    # numpy has no bfloat16: reinterpret its bits as uint16, which keeps them exactly.
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array)


def tensor_bytes(array: mx.array) -> bytes:
    """The array's elements as raw bytes in C order (bfloat16 as its uint16 bit pattern)."""
    _dtype_code(array.dtype)
    return _host_array(array).tobytes(order="C")


def encode_tensor(array: mx.array) -> bytes:
    """Encode an array as header (dtype, shape) + xxh3-64 checksum + exact element bytes.

    Evaluates the array if it is not evaluated yet.
    """
    code = _dtype_code(array.dtype)
    if array.ndim > 255:
        raise ValueError(f"tensor has {array.ndim} dimensions; at most 255 can be encoded")
    payload = _host_array(array).tobytes(order="C")
    header = _PREFIX.pack(MAGIC, VERSION, code, array.ndim) + b"".join(
        _U64.pack(n) for n in array.shape
    )
    digest = xxhash.xxh3_64(header)
    digest.update(payload)
    return header + _U64.pack(digest.intdigest()) + payload


def decode_tensor(data: bytes | bytearray | memoryview) -> mx.array:
    """Decode `encode_tensor` output back into the identical array.

    Raises:
        TensorDecodeError: the bytes are truncated, of an unknown format or version, or do
            not match their checksum.
    """
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise TensorDecodeError(f"tensor bytes truncated: {len(view)} bytes, no header")
    magic, version, code, ndim = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise TensorDecodeError(f"not an encoded tensor: magic {bytes(magic)!r}, want {MAGIC!r}")
    if version != VERSION:
        raise TensorDecodeError(f"encoded tensor version {version}; this code reads {VERSION}")
    if code not in _DTYPES:
        raise TensorDecodeError(f"unknown tensor dtype code {code}")
    header_size = _PREFIX.size + ndim * _U64.size
    if len(view) < header_size + _U64.size:
        raise TensorDecodeError(f"tensor bytes truncated: {len(view)} bytes, header incomplete")
    shape = tuple(_U64.unpack_from(view, _PREFIX.size + i * _U64.size)[0] for i in range(ndim))
    (expected,) = _U64.unpack_from(view, header_size)
    payload = view[header_size + _U64.size :]
    mx_dtype, np_dtype = _DTYPES[code]
    want_bytes = math.prod(shape) * np_dtype.itemsize
    digest = xxhash.xxh3_64(view[:header_size])
    digest.update(payload)
    actual = digest.intdigest()
    # The checksum is checked before the length so that a corrupted shape reads as corruption.
    if actual != expected:
        raise TensorDecodeError(
            f"tensor checksum mismatch: header says {expected:#018x}, the bytes give "
            f"{actual:#018x} ({len(view)} bytes, dtype {mx_dtype}, shape {shape})"
        )
    if len(payload) != want_bytes:
        raise TensorDecodeError(
            f"tensor payload is {len(payload)} bytes; dtype {mx_dtype} and shape {shape} "
            f"need {want_bytes}"
        )
    host = np.frombuffer(payload, dtype=np_dtype).reshape(shape)
    if mx_dtype == mx.bfloat16:
        return mx.array(host, dtype=mx.uint16).view(mx.bfloat16)
    # An explicit dtype, since mx.array would turn float64 into float32.
    return mx.array(host, dtype=mx_dtype)


def fingerprint(array: mx.array, row_offset: int = 0) -> int:
    """An order-independent 64-bit fingerprint: the XOR of one xxh3-64 hash per row.

    A row is one index along axis 0, with the other axes flattened (a 0-d array is one row).
    Each row's hash covers the dtype, the row's shape and its exact bytes, and is seeded
    with the row's global index `row_offset + i`, so permuting rows changes the fingerprint.

    Because XOR is associative and commutative, for any split of the rows of `whole` into
    disjoint shards, shard k holding rows `[start_k, stop_k)`:

        combine(*(fingerprint(whole[start_k:stop_k], start_k) for k ...)) == fingerprint(whole)

    so shards computed on different nodes can be checked against the whole without
    gathering it. The converse caveat: a row counted twice cancels out, so check separately
    that the shards are disjoint and cover every row. An array with no rows fingerprints to 0.
    """
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    host = _host_array(array)
    if host.ndim == 0:
        host = host.reshape(1)
    rows = host.reshape(host.shape[0], math.prod(host.shape[1:]))
    prefix = bytes([_dtype_code(array.dtype)]) + b"".join(_U64.pack(n) for n in host.shape[1:])
    raw = rows.tobytes()
    row_size = rows.shape[1] * rows.dtype.itemsize
    result = 0
    for i in range(rows.shape[0]):
        row = raw[i * row_size : (i + 1) * row_size]
        result ^= xxhash.xxh3_64_intdigest(prefix + row, seed=row_offset + i)
    return result


def combine(*fingerprints: int) -> int:
    """Combine fingerprints of disjoint row shards into the fingerprint of their union."""
    return reduce(lambda a, b: a ^ b, fingerprints, 0) & _MASK64


def damage(data: bytes, rng: random.Random) -> bytes:
    """Fault injection: `data` (codec bytes) with one byte of its second half flipped: the
    tensor's elements, not the codec header, so the receiver's checksum (not its parser) is
    what catches it."""
    damaged = bytearray(data)
    damaged[rng.randrange(len(data) // 2, len(data))] ^= 0xFF
    return bytes(damaged)
