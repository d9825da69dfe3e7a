"""The wire format: round trips, and `decode` raising only DecodeError for any input."""

from __future__ import annotations

import attrs
import msgpack
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from p2p_reliable.control import AckInfo, decode_ack, encode_ack
from p2p_reliable.envelope import (
    BATCH_MAGIC,
    MAGIC,
    VERSION,
    ChecksumError,
    DecodeError,
    Envelope,
    Flags,
    Kind,
    decode,
    decode_batch,
    encode,
    encode_batch,
)
from p2p_reliable.rangeset import RangeSet

U64 = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    kind = draw(st.sampled_from(list(Kind)))
    count = draw(st.integers(1, 1000)) if kind == Kind.FRAGMENT else 1
    return Envelope(
        kind=kind,
        origin=draw(st.text(min_size=1, max_size=128)),
        stream=draw(st.text(max_size=256)),
        epoch=draw(U64),
        seq=draw(st.integers(0, 2**63 - 1)),
        payload=draw(st.binary(max_size=2048)),
        frag_index=draw(st.integers(0, count - 1)),
        frag_count=count,
        flags=draw(st.sampled_from([Flags.NONE, Flags.COMPRESSED, Flags.DIRECT, Flags(3)])),
    )


def _seal(body: bytes, version: int = VERSION) -> bytes:
    """Wrap an arbitrary body with a valid header and checksum (a well-formed forgery)."""
    data = MAGIC + bytes([version]) + body
    return data + xxhash.xxh3_64_digest(data)


@given(envelopes())
def test_round_trip(env: Envelope) -> None:
    assert decode(encode(env)) == env


@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        env = decode(data)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert isinstance(env, Envelope)


@st.composite
def resealed_mutations(draw: st.DrawFn) -> bytes:
    """A real envelope whose body was damaged (bytes flipped, cut, inserted or repeated) and
    then sealed again with a valid header and checksum: input that reaches the parser, as
    random bytes almost never do (they fail the magic or the checksum first)."""
    body = bytearray(encode(draw(envelopes()))[len(MAGIC) + 1 : -8])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        pos = draw(st.integers(0, len(body)))
        if op == "flip" and pos < len(body):
            body[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del body[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            body[pos:pos] = body[pos : pos + draw(st.integers(1, 16))]
    return _seal(bytes(body))


@given(resealed_mutations())
def test_resealed_mutations_reach_the_parser_and_raise_only_decode_error(wire: bytes) -> None:
    try:
        env = decode(wire)
    except DecodeError as exc:
        assert not isinstance(exc, ChecksumError)  # the checksum held: the parser refused it
        assert exc.reason
    else:
        assert encode(env) == wire  # only a real envelope gets through, exactly as it was


@given(st.binary(max_size=512))
def test_any_body_with_valid_checksum_decodes_or_raises_decode_error(body: bytes) -> None:
    # Past the checksum, the parser itself must hold against every body.
    try:
        decode(_seal(body))
    except DecodeError as exc:
        assert not isinstance(exc, ChecksumError)


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.floats(),
            st.text(max_size=300),
            st.binary(max_size=64),
            st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
        ),
        min_size=0,
        max_size=12,
    )
)
def test_wrong_field_types_raise_decode_error(fields: list[object]) -> None:
    try:
        env = decode(_seal(msgpack.packb(fields, use_bin_type=True)))
    except DecodeError:
        return
    # Only a body that really is a valid envelope may get through.
    assert encode(env) == _seal(msgpack.packb(fields, use_bin_type=True))


@given(envelopes(), st.data())
def test_any_damage_is_detected(env: Envelope, data: st.DataObject) -> None:
    wire = bytearray(encode(env))
    pos = data.draw(st.integers(0, len(wire) - 1))
    wire[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(DecodeError):
        decode(bytes(wire))


@given(envelopes(), st.data())
def test_truncation_is_detected(env: Envelope, data: st.DataObject) -> None:
    wire = encode(env)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(DecodeError):
        decode(wire[:cut])


def test_specific_rejections_say_why() -> None:
    good = encode(Envelope(kind=Kind.DATA, origin="a", stream="s", epoch=1, seq=2, payload=b"x"))
    cases = {
        b"": "truncated",
        b"XX" + good[2:]: "bad magic",
        good[:2] + b"\x09" + good[3:]: "unsupported version 9",
        good[:-1] + bytes([good[-1] ^ 1]): "checksum mismatch",
        _seal(msgpack.packb([1, 0, "a", "s", 1, 2, 0, 1])): "body is not a 9-field array",
        _seal(msgpack.packb([99, 0, "a", "s", 1, 2, 0, 1, b""])): "unknown kind 99",
        _seal(msgpack.packb([1, 64, "a", "s", 1, 2, 0, 1, b""])): "unknown flags 0x40",
        _seal(msgpack.packb([1, 0, "", "s", 1, 2, 0, 1, b""])): "bad origin",
        _seal(msgpack.packb([1, 0, "a", "s", -1, 2, 0, 1, b""])): "epoch is not",
        _seal(msgpack.packb([1, 0, "a", "s", 1, True, 0, 1, b""])): "seq is not",
        _seal(msgpack.packb([2, 0, "a", "s", 1, 2, 5, 5, b""], use_bin_type=True)): "bad fragment",
        _seal(msgpack.packb([1, 0, "a", "s", 1, 2, 0, 2, b""], use_bin_type=True)): "only FRAGMENT",
        _seal(msgpack.packb([1, 0, "a", "s", 1, 2, 0, 1, "text"])): "payload is not bytes",
        _seal(b"\xc1"): "malformed body",
        _seal(msgpack.packb([1, 0, "a", "s", 1, 2**63, 0, 1, b""])): "beyond the sequence space",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError) as info:
            decode(data)
        assert reason in info.value.reason, (data, info.value.reason)
    with pytest.raises(DecodeError, match="expected bytes"):
        decode("not bytes")


def test_checksum_failure_is_its_own_error() -> None:
    wire = bytearray(encode(Envelope(kind=Kind.ACK, origin="a", stream="", epoch=0, seq=0)))
    wire[-1] ^= 0xFF
    with pytest.raises(ChecksumError):
        decode(bytes(wire))


@given(st.lists(envelopes(), min_size=1, max_size=20))
def test_batch_round_trip(envs: list[Envelope]) -> None:
    frame = encode_batch([encode(e) for e in envs])
    assert [decode(raw) for raw in decode_batch(frame)] == envs


@given(st.binary(max_size=2048))
def test_any_batch_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        items = decode_batch(BATCH_MAGIC + data)
    except DecodeError as exc:
        assert exc.reason
        return
    assert all(isinstance(raw, bytes) for raw in items)
    for raw in items:
        try:
            decode(raw)
        except DecodeError as exc:
            assert exc.reason


@given(st.lists(envelopes(), min_size=1, max_size=5), resealed_mutations(), st.data())
def test_a_batch_with_a_resealed_mutation_keeps_its_good_envelopes(
    envs: list[Envelope], bad: bytes, data: st.DataObject
) -> None:
    raws = [encode(e) for e in envs]
    at = data.draw(st.integers(0, len(raws)))
    raws.insert(at, bad)
    items = decode_batch(encode_batch(raws))
    assert items == raws
    good = [decode(raw) for i, raw in enumerate(items) if i != at]
    assert good == envs  # the damaged one does not spoil its neighbours
    try:
        decode(items[at])
    except DecodeError as exc:
        assert not isinstance(exc, ChecksumError)


# -- cluster secrets -------------------------------------------------------------------------

from p2p_reliable.envelope import AuthError, EnvelopeCodec  # noqa: E402


@given(envelopes())
def test_cluster_tagged_round_trip_and_foreign_envelopes(env: Envelope) -> None:
    ours, theirs, open_codec = EnvelopeCodec(b"s3cret"), EnvelopeCodec(b"other"), EnvelopeCodec()
    wire = ours.encode(env)
    assert ours.decode(wire) == env
    for stranger, data in ((theirs, wire), (ours, encode(env)), (open_codec, wire)):
        with pytest.raises(AuthError):
            stranger.decode(data)


@given(envelopes(), st.data())
def test_damage_to_a_tagged_envelope_is_damage_not_intrusion(
    env: Envelope, data: st.DataObject
) -> None:
    codec = EnvelopeCodec(b"s3cret")
    wire = bytearray(codec.encode(env))
    pos = data.draw(st.integers(0, len(wire) - 1))
    wire[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(DecodeError) as info:
        codec.decode(bytes(wire))
    assert not isinstance(info.value, AuthError)  # counted as corruption, not as an intruder


@given(st.binary(max_size=2048))
def test_keyed_decoder_raises_only_decode_error(data: bytes) -> None:
    try:
        env = EnvelopeCodec(b"k").decode(data)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert EnvelopeCodec(b"k").encode(env) == data


@given(resealed_mutations())
def test_keyed_decoder_refuses_resealed_mutations_without_the_tag(wire: bytes) -> None:
    # A plain envelope, however well sealed, carries no cluster tag: refused as a stranger's;
    # one cut shorter than any envelope can be is refused as damage.
    with pytest.raises(DecodeError) as refused:
        EnvelopeCodec(b"k").decode(wire)
    assert isinstance(refused.value, AuthError) or str(refused.value).startswith("truncated")


@given(envelopes(), st.sampled_from([None, b"k"]))
def test_marking_a_copy_as_sent_again_changes_that_flag_only(
    env: Envelope, secret: bytes | None
) -> None:
    codec = EnvelopeCodec(secret)
    again = codec.mark_again(codec.encode(env))
    assert codec.decode(again) == attrs.evolve(env, flags=env.flags | Flags.AGAIN)
    assert codec.mark_again(again) == again


@pytest.mark.parametrize("original", [None, True, False])
def test_acks_say_whether_the_original_came_first_or_nothing(original: bool | None) -> None:
    info = AckInfo(floor=3, ranges=RangeSet(), ack_delay=0.002, limit=9, original=original)
    assert decode_ack(encode_ack(info)) == info
    # An ack of four fields (from a receiver that does not say) is read as "not said".
    four = msgpack.packb([3, [], 2000, 9])
    assert decode_ack(four).original is None
    for bad in (2, True, 0.5, "1"):
        with pytest.raises(DecodeError):
            decode_ack(msgpack.packb([3, [], 2000, 9, bad]))
