"""Tensor bytes with checksums, and the XOR-combinable tensor fingerprint."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_glue.tensor_codec import (
    TensorDecodeError,
    combine,
    decode_tensor,
    encode_tensor,
    fingerprint,
    tensor_bytes,
)

ALL_DTYPES = [
    mx.bool_,
    mx.uint8,
    mx.uint16,
    mx.uint32,
    mx.uint64,
    mx.int8,
    mx.int16,
    mx.int32,
    mx.int64,
    mx.float16,
    mx.bfloat16,
    mx.float32,
    mx.float64,
    mx.complex64,
]


def random_array(shape: tuple[int, ...], dtype: mx.Dtype, seed: int = 0) -> mx.array:
    """Arbitrary bit patterns of `dtype` (NaNs and infinities included for floats)."""
    rng = np.random.default_rng(seed)
    size = mx.zeros((1,), dtype=dtype).itemsize
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * size, dtype=np.uint8)
    as_u8 = mx.array(raw)
    if dtype == mx.bool_:
        return (as_u8 & 1).astype(mx.bool_).reshape(shape)
    return as_u8.view(dtype).reshape(shape)


def same_bits(a: mx.array, b: mx.array) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_is_bit_exact_for_every_dtype(dtype: mx.Dtype) -> None:
    for shape in [(), (0,), (3, 0, 2), (1, 5, 16), (7,)]:
        array = random_array(shape, dtype)
        decoded = decode_tensor(encode_tensor(array))
        assert same_bits(decoded, array), (dtype, shape)


def test_bfloat16_hidden_state_keeps_its_dtype_and_bits() -> None:
    hidden = (mx.random.normal((1, 4, 64), key=mx.random.key(1)) * 3).astype(mx.bfloat16)
    decoded = decode_tensor(encode_tensor(hidden))
    assert decoded.dtype == mx.bfloat16
    assert mx.array_equal(decoded.view(mx.uint16), hidden.view(mx.uint16)).item()


def test_non_contiguous_arrays_encode_in_logical_order() -> None:
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    view = base.transpose(2, 0, 1)[:, ::-1]
    decoded = decode_tensor(encode_tensor(view))
    assert mx.array_equal(decoded, view).item()
    assert np.array_equal(np.asarray(decoded), np.asarray(view))


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_corrupted_byte_is_detected(position: int, flip: int) -> None:
    wire = bytearray(encode_tensor(random_array((2, 3, 8), mx.float32)))
    wire[position % len(wire)] ^= flip
    with pytest.raises(TensorDecodeError):
        decode_tensor(bytes(wire))


def test_decode_errors_say_what_is_wrong() -> None:
    wire = encode_tensor(mx.ones((2, 8), dtype=mx.bfloat16))
    corrupted = bytearray(wire)
    corrupted[-1] ^= 0x01
    with pytest.raises(TensorDecodeError, match=r"checksum mismatch.*bfloat16.*\(2, 8\)"):
        decode_tensor(bytes(corrupted))
    with pytest.raises(TensorDecodeError, match="truncated"):
        decode_tensor(wire[:3])
    with pytest.raises(TensorDecodeError, match="checksum mismatch"):
        decode_tensor(wire[:-2])
    with pytest.raises(TensorDecodeError, match="magic"):
        decode_tensor(b"XX" + wire[2:])


def test_decode_accepts_memoryview_and_bytearray() -> None:
    array = random_array((3, 4), mx.int32)
    wire = encode_tensor(array)
    assert same_bits(decode_tensor(memoryview(wire)), array)
    assert same_bits(decode_tensor(bytearray(wire)), array)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=40),
    cols=st.integers(min_value=0, max_value=9),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=5),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_fingerprint_of_disjoint_shards_combines_to_the_whole(
    rows: int, cols: int, cuts: list[int], seed: int
) -> None:
    whole = random_array((rows, cols, 2), mx.float32, seed)
    bounds = sorted({0, rows, *(c % (rows + 1) for c in cuts)})
    shards = [
        fingerprint(whole[start:stop], row_offset=start)
        for start, stop in itertools.pairwise(bounds)
    ]
    assert combine(*shards) == fingerprint(whole)
    # Order of combination does not matter.
    assert combine(*reversed(shards)) == fingerprint(whole)


def test_fingerprint_sees_a_flipped_bit_and_swapped_rows() -> None:
    whole = random_array((8, 16), mx.float32, seed=3)
    reference = fingerprint(whole)
    raw = bytearray(tensor_bytes(whole))
    for byte in (0, 37, len(raw) - 1):
        for bit in (0, 7):
            flipped = bytearray(raw)
            flipped[byte] ^= 1 << bit
            changed = mx.array(np.frombuffer(bytes(flipped), dtype=np.float32).reshape(8, 16))
            assert fingerprint(changed) != reference
    swapped = mx.concatenate([whole[1:2], whole[0:1], whole[2:]])
    assert fingerprint(swapped) != reference
    # A shard fingerprinted at the wrong offset does not combine to the whole.
    assert combine(fingerprint(whole[:4]), fingerprint(whole[4:])) != reference


def test_fingerprint_depends_on_dtype_and_row_shape() -> None:
    data = random_array((4, 6), mx.int32, seed=5)
    assert fingerprint(data) != fingerprint(data.view(mx.float32))
    assert fingerprint(data) != fingerprint(data.reshape(4, 2, 3))
    assert fingerprint(mx.zeros((0, 5))) == 0
    assert combine() == 0
    # bfloat16 fingerprints through its bit pattern.
    bf = data.view(mx.bfloat16)
    assert fingerprint(bf) == combine(fingerprint(bf[:1]), fingerprint(bf[1:], row_offset=1))
