"""Channels, typed topics and the fault shim: the router's parts that need no network."""

from __future__ import annotations

import json
from typing import Any

import anyio
import attrs
import pytest

from router import ConnectionMessage, PublishPolicy, TopicDecodeError, TypedTopic, channel
from router.faults import FaultConfig, FaultShim


def test_channels_behave_like_exos() -> None:
    async def main() -> None:
        send, recv = channel[int](4)
        other = recv.clone_sender()
        with send, other:
            await send.send(1)
            await other.send(2)
            send.send_nowait(3)
            assert recv.collect() == [1, 2, 3]
            assert recv.collect() == []
            for i in range(4):
                send.send_nowait(i)
            with pytest.raises(anyio.WouldBlock):
                send.send_nowait(99)  # bounded: full means wait, not grow
            assert await recv.receive_at_least(2) == [0, 1, 2, 3]
        # All senders closed: iteration ends.
        assert [x async for x in recv] == []
        with pytest.raises(anyio.ClosedResourceError):
            send.clone()
        s2, r2 = channel[str]()
        r2.close()
        with pytest.raises(anyio.BrokenResourceError):
            await s2.send("nobody listens")

    for backend in ("asyncio", "trio"):
        anyio.run(main, backend=backend)


@attrs.frozen
class Point:
    x: int
    label: str


class PydanticLike:
    """What exo's FrozenModel offers: its own JSON methods (pydantic is not needed)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def model_dump_json(self) -> str:
        return json.dumps({"value": self.value})

    @classmethod
    def model_validate_json(cls, data: str) -> PydanticLike:
        fields = json.loads(data)
        if set(fields) != {"value"} or not isinstance(fields["value"], int):
            raise ValueError("validation error")
        return cls(fields["value"])


def test_topic_codecs_round_trip() -> None:
    attrs_topic = TypedTopic("p", PublishPolicy.Always, Point)
    assert attrs_topic.deserialize(attrs_topic.serialize(Point(3, "é"))) == Point(3, "é")
    model_topic = TypedTopic("m", PublishPolicy.Always, PydanticLike)
    assert model_topic.deserialize(model_topic.serialize(PydanticLike(7))).value == 7
    raw = TypedTopic("r", PublishPolicy.Always, bytes)
    assert raw.deserialize(raw.serialize(b"\x00\xff")) == b"\x00\xff"
    conn = TypedTopic("c", PublishPolicy.Never, ConnectionMessage)
    msg = ConnectionMessage(node_id="12D3KooW", connected=True)
    assert conn.deserialize(conn.serialize(msg)) == msg


@pytest.mark.parametrize(
    ("topic", "data"),
    [
        (TypedTopic("p", PublishPolicy.Always, Point), b"\xc1"),
        (TypedTopic("p", PublishPolicy.Always, Point), b"\x93\x01\x02\x03"),  # a list
        (TypedTopic("p", PublishPolicy.Always, Point), b"\x81\xa1y\x01"),  # wrong field
        (TypedTopic("m", PublishPolicy.Always, PydanticLike), b'{"other": 1}'),
        (TypedTopic("m", PublishPolicy.Always, PydanticLike), b"\xff\xfe"),
        (TypedTopic("s", PublishPolicy.Always, str), b"\xff"),
    ],
)
def test_wrong_payloads_raise_one_clear_error(topic: TypedTopic[Any], data: bytes) -> None:
    with pytest.raises(TopicDecodeError, match=f"topic '{topic.topic}'"):
        topic.deserialize(data)


def test_fault_config_parsing() -> None:
    config = FaultConfig.parse("drop=0.1, dup=0.05,reorder=0.2,corrupt=0.01,delay=0.002,seed=4")
    assert (config.drop, config.duplicate, config.reorder, config.corrupt) == (0.1, 0.05, 0.2, 0.01)
    assert config.seed == 4 and config.active
    assert not FaultConfig.parse("").active
    for bad in ("drop", "nonsense=1", "drop=2", "drop=x"):
        with pytest.raises(ValueError):
            FaultConfig.parse(bad)


def test_fault_shim_statistics_match_its_config() -> None:
    shim = FaultShim(FaultConfig(drop=0.2, duplicate=0.1, corrupt=0.05, reorder=0.3, seed=1))
    frame = bytes(range(200))
    outputs = [shim.inbound(frame, "peer") for _ in range(20_000)]
    stats = shim.stats
    assert stats.frames == 20_000
    assert 0.18 < stats.dropped / stats.frames < 0.22
    delivered = [shim.damage(f, "peer") for out in outputs for _, f in out]
    assert len(delivered) == stats.frames - stats.dropped + stats.duplicated
    assert 0 < sum(f != frame for f in delivered) == stats.corrupted
    assert stats.corrupted_from == {"peer": stats.corrupted}
    clean = FaultShim()
    clean.partitioned = {"peer"}
    assert clean.inbound(frame, "peer") == [] and clean.blocks("peer")
    assert clean.inbound(frame, "other") == [(0.0, frame)]
    assert clean.stats.partitioned == 1


def test_direct_stream_frames_are_cut_from_a_buffer() -> None:
    from libp2p.utils.varint import encode_varint_prefixed

    from router.directs import FrameTooLarge, _cut_frame, _pieces

    frames = [b"", b"a", bytes(range(256)) * 600, b"z" * 127, b"y" * 128]
    wire = bytearray(b"".join(encode_varint_prefixed(f) for f in frames))
    # Fed one byte at a time, the frames come out whole, in order, and nothing more.
    buffer = bytearray()
    out = []
    for byte in wire:
        buffer.append(byte)
        used = 0
        while (cut := _cut_frame(buffer, used, 1 << 20)) is not None:
            frame, used = cut
            out.append(frame)
        del buffer[:used]
    assert out == frames and not buffer
    # The writer's side: pieces of at most one size, which together are the same bytes.
    for size in (1, 7, 128, 65507):
        pieces = list(_pieces(frames, size))
        assert b"".join(pieces) == wire
        assert all(0 < len(p) <= size for p in pieces) and len(pieces) == -(-len(wire) // size)
    # An oversized length is refused from its prefix alone, before the body arrives.
    with pytest.raises(FrameTooLarge):
        _cut_frame(bytearray(encode_varint_prefixed(b"x" * 101)[:3]), 0, 100)
    with pytest.raises(ValueError):
        _cut_frame(bytearray(b"\xff" * 11), 0, 1 << 62)
