"""Well-formed but hostile or nonsensical envelopes from an authenticated peer, and replays."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_reliable import Delivered, Envelope, Flags, Kind, encode
from p2p_reliable.control import AckInfo, StreamMark, encode_ack, encode_heartbeat, encode_ranges
from p2p_reliable.rangeset import RangeSet
from p2p_reliable.testing import LinkFaults, SimNetwork

TOPIC = "t"
U64 = st.integers(0, 2**63 - 1)
SMALL = st.integers(0, 50)
SEQ = st.one_of(SMALL, U64)


@st.composite
def ranges(draw: st.DrawFn) -> RangeSet:
    out = RangeSet()
    for start, length in draw(st.lists(st.tuples(SEQ, st.integers(1, 2**40)), min_size=1)):
        out.add(start, min(start + length, 2**63))
    return out if out else RangeSet([range(0, 1)])


@st.composite
def hostile(draw: st.DrawFn) -> Envelope:
    kind = draw(st.sampled_from(list(Kind)))
    payload: bytes
    if kind == Kind.ACK:
        payload = encode_ack(
            AckInfo(floor=draw(SEQ), ranges=draw(ranges()), ack_delay=0.0, limit=draw(SEQ))
        )
    elif kind in (Kind.NACK, Kind.GAP):
        payload = encode_ranges(draw(ranges()))
    elif kind == Kind.HEARTBEAT:
        marks = [
            StreamMark(
                stream=TOPIC,
                flags=Flags(draw(st.sampled_from([0, 2]))),
                epoch=draw(SMALL),
                next_seq=draw(SEQ),
                limit=draw(SEQ),
            )
            for _ in range(draw(st.integers(0, 3)))
        ]
        payload = encode_heartbeat(marks)
    else:
        payload = draw(st.binary(max_size=64))
    count = draw(st.integers(1, 2**20)) if kind == Kind.FRAGMENT else 1
    return Envelope(
        kind=kind,
        origin="A",
        stream=draw(st.sampled_from([TOPIC, "d", "other"])),
        epoch=draw(st.sampled_from([0, 1, 2, 2**64 - 1])),
        seq=draw(SEQ),
        payload=payload,
        frag_index=draw(st.integers(0, count - 1)),
        frag_count=count,
        flags=Flags(draw(st.sampled_from([0, 1, 2, 3]))),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(hostile(), st.floats(0, 0.5)), max_size=15))
def test_hostile_envelopes_never_crash_either_side(items: list[tuple[Envelope, float]]) -> None:
    net = SimNetwork(seed=0)
    net.add_node("A")
    b = net.add_node("B")
    net.subscribe("B", TOPIC)
    net.subscribe("A", TOPIC)
    net.publish("B", TOPIC, b"real")
    net.send("B", "A", "d", b"real")
    net.run(0.01)
    for env, dt in items:
        b.endpoint.receive(encode(env), "A", net.now)
        net.run(net.now + dt, max_steps=20_000)
    # B still works: what it publishes afterwards reaches A, hostile input notwithstanding.
    net.publish("B", TOPIC, b"after")
    net.send("B", "A", "d", b"after")
    net.run(net.now + 30.0, max_steps=200_000)
    got = [d.payload for d in net.nodes["A"].delivered() if d.origin == "B"]
    assert got.count(b"real") == 2 and got.count(b"after") == 2
    assert all(isinstance(e, Delivered) for e in net.nodes["A"].delivered())


def _run(seed: int) -> list[object]:
    net = SimNetwork(
        seed=seed, faults=LinkFaults(drop=0.2, duplicate=0.1, reorder=0.2, corrupt=0.03)
    )
    for name in "ABC":
        net.add_node(name)
    net.subscribe("B", TOPIC)
    net.subscribe("C", TOPIC)
    for i in range(30):
        net.publish("A", TOPIC, bytes([i]) * (i * 100))
    net.run(5.0)
    return [(name, node.events) for name, node in net.nodes.items()] + [net.stats]


def test_same_seed_replays_exactly() -> None:
    assert _run(11) == _run(11)
    assert _run(11) != _run(12)
