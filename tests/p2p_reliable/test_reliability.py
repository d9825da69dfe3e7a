"""End-to-end properties of the protocol over the simulated network, in virtual time."""

from __future__ import annotations

import random

import attrs
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_reliable import (
    Delivered,
    Endpoint,
    Gap,
    KiB,
    ProtocolConfig,
    RetryPolicy,
    Unrecoverable,
    WindowOpen,
)
from p2p_reliable.envelope import MAGIC, VERSION, DecodeError, Envelope, Flags, Kind, decode, encode
from p2p_reliable.testing import LinkFaults, SimNetwork

TOPIC = "t"
# Small fragments and frames so faults hit single messages and fragmentation is exercised.
# The retry budget outlasts the finite partitions below, so nothing may be given up.
PATIENT = ProtocolConfig(
    max_fragment_payload=256,
    max_frame_bytes=1 * KiB,
    compress_threshold=512,
    max_message_size=64 * KiB,
    window_messages=16,
    retry=RetryPolicy(base=0.05, min_rto=0.02, cap=1.0, max_attempts=40),
)

faults_strategy = st.builds(
    LinkFaults,
    drop=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.3),
    reorder=st.floats(0.0, 0.3),
    corrupt=st.floats(0.0, 0.05),
)
partitions_strategy = st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.05, 3.0)), max_size=2)


def _payloads(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, 100, 255, 256, 257, 1000, 3000]
    return [
        rng.choice([rng.randbytes, lambda n: b"z" * n])(rng.choice(sizes)) + bytes([i % 256])
        for i in range(count)
    ]


def _within_budgets(ep: Endpoint) -> bool:
    cfg, budget = ep.config, ep.budget
    for key in ep.streams.keys():
        rcv = ep.streams.get(key)
        assert rcv is not None and budget.used(key[0]) >= rcv.held_bytes()
        assert budget.used(key[0]) <= cfg.peer_receive_bytes + budget.slack
    return budget.total <= cfg.total_receive_bytes + budget.slack


def _payloads_of(delivered: list[Delivered], origin: str) -> list[bytes]:
    return [d.payload for d in delivered if d.origin == origin]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    faults=faults_strategy,
    partitions=partitions_strategy,
    count=st.integers(1, 25),
    flow_control=st.booleans(),
    small_budgets=st.booleans(),
)
def test_exactly_once_in_order_through_faults_and_finite_partitions(
    seed: int,
    faults: LinkFaults,
    partitions: list[tuple[float, float]],
    count: int,
    flow_control: bool,
    small_budgets: bool,
) -> None:
    net = SimNetwork(seed=seed, faults=faults)
    config = attrs.evolve(PATIENT, flow_control=flow_control, receive_window=24)
    if small_budgets:
        # Byte budgets smaller than the larger messages (up to ~6 KiB with overheads): they
        # pass one at a time as exceptions, and B's two publishers contend for its total.
        config = attrs.evolve(config, peer_receive_bytes=4 * KiB, total_receive_bytes=6 * KiB)
    for name in "ABC":
        net.add_node(name, config=config)
    net.subscribe("B", TOPIC)
    net.subscribe("C", TOPIC)
    for start, length in partitions:
        net.partition("A", "C", start, start + length)
    msgs = _payloads(seed, count)
    for m in msgs:
        net.publish("A", TOPIC, m)
        net.send("A", "B", "direct", m)
        net.publish("C", TOPIC, m[::-1])  # C publishes too: per-publisher order

    def done() -> bool:
        b, c = net.nodes["B"], net.nodes["C"]
        assert all(_within_budgets(n.endpoint) for n in net.nodes.values())  # at every step
        return (
            len(b.delivered(TOPIC)) == 2 * count
            and len(c.delivered(TOPIC)) == count
            and len(b.delivered("direct")) == count
        )

    assert net.run_until(done, until=300.0), f"stuck at t={net.now}"
    # Run on a little: late duplicates and retransmissions must not deliver anything twice.
    net.run(net.now + 3.0)
    b, c = net.nodes["B"], net.nodes["C"]
    assert _payloads_of(b.delivered(TOPIC), "A") == msgs
    assert _payloads_of(b.delivered(TOPIC), "C") == [m[::-1] for m in msgs]
    assert _payloads_of(c.delivered(TOPIC), "A") == msgs
    assert [d.payload for d in b.delivered("direct")] == msgs
    for node in net.nodes.values():
        assert node.gaps() == [] and node.unrecoverable() == []
        stats = node.endpoint.stats  # a compliant publisher is never refused (only damage is)
        assert stats.over_credit == stats.too_many_streams == stats.decompression_refused == 0
        seqs: dict[tuple[str, str], list[int]] = {}
        for d in node.delivered():
            seqs.setdefault((d.origin, d.stream), []).append(d.seq)
        assert all(s == sorted(set(s)) for s in seqs.values())


def _lossy_then_cut(seed: int, drop_seq: int | None) -> SimNetwork:
    # Frames of one envelope each, so that dropping one message drops nothing else.
    config = ProtocolConfig(
        retry=RetryPolicy(base=0.05, min_rto=0.02, cap=0.5, max_attempts=5),
        max_fragment_payload=64,
        max_frame_bytes=64,
        max_message_size=4 * KiB,
    )
    net = SimNetwork(seed=seed)
    net.add_node("A", config=config)
    net.add_node("B", config=config)
    net.subscribe("B", TOPIC)
    if drop_seq is not None:
        # Every transmission of one message is lost, first and repeats alike.
        from p2p_reliable.envelope import Kind, decode, decode_batch

        def drop(src: str, dst: str, data: bytes) -> bool:
            for raw in decode_batch(data):
                env = decode(raw)
                if env.kind == Kind.DATA and env.seq == drop_seq:
                    return True
            return False

        net.drop_filter = drop
    return net


def test_permanent_partition_gives_unrecoverable_and_gap_in_bounded_time() -> None:
    net = _lossy_then_cut(seed=3, drop_seq=2)
    for i in range(6):
        net.publish("A", TOPIC, f"m{i}".encode())
    net.run(0.02)  # 0, 1, 3, 4, 5 arrive; 2 never does
    net.partition("A", "B", net.now, None)
    a, b = net.nodes["A"], net.nodes["B"]
    config = a.endpoint.config
    bound = net.now + config.retry.max_span() + config.effective_gap_timeout + 1.0
    assert net.run_until(lambda: bool(a.unrecoverable()) and bool(b.gaps()), until=bound)
    assert [u.seq for u in a.unrecoverable()] == [2]
    assert [(g.start, g.stop) for g in b.gaps()] == [(2, 3)]
    assert [d.payload for d in b.delivered()] == [b"m0", b"m1", b"m3", b"m4", b"m5"]


def test_publisher_gives_up_and_tells_the_receiver() -> None:
    net = _lossy_then_cut(seed=4, drop_seq=2)
    for i in range(6):
        net.publish("A", TOPIC, f"m{i}".encode())
    a, b = net.nodes["A"], net.nodes["B"]
    assert net.run_until(lambda: len(b.delivered()) == 5, until=30.0)
    (verdict,) = a.unrecoverable()
    (gap,) = b.gaps()
    assert (verdict.seq, verdict.peer) == (2, "B")
    assert (gap.start, gap.stop, gap.reason) == (2, 3, "publisher could not repair")
    # The receiver learnt it from the publisher's GAP notice, long before its own timeout.
    assert net.now < b.endpoint.config.effective_gap_timeout


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    drop=st.floats(0.0, 0.3),
    reorder=st.floats(0.0, 0.3),
    cut_at=st.floats(0.0, 0.05),
)
def test_every_message_is_delivered_or_reported_under_a_permanent_cut(
    seed: int, drop: float, reorder: float, cut_at: float
) -> None:
    net = _lossy_then_cut(seed, drop_seq=None)
    net.default_faults = LinkFaults(drop=drop, reorder=reorder)
    config = net.nodes["A"].endpoint.config
    for i in range(40):
        net.publish("A", TOPIC, f"m{i}".encode())
    net.partition("A", "B", cut_at, None)
    net.run(config.retry.max_span() + config.effective_gap_timeout + 2.0)
    a, b = net.nodes["A"], net.nodes["B"]
    delivered = {d.seq for d in b.delivered()}
    given_up = {u.seq for u in a.unrecoverable()}
    assert delivered | given_up == set(range(40))  # no silent loss
    assert [d.seq for d in b.delivered()] == sorted(delivered)
    # Whatever the receiver reported as a gap, the publisher reported too.
    for gap in b.gaps():
        assert set(range(gap.start, gap.stop)) <= given_up
    rcv = b.endpoint.inbound("A", TOPIC)
    if rcv is not None:  # (it heard nothing at all when the cut came first)
        assert rcv.next >= rcv.high_water  # no hole it knows of is left pending


def test_a_killed_peer_turns_dead_in_the_others_view() -> None:
    from p2p_reliable import PeerState

    net = SimNetwork(seed=1)
    net.add_node("A")
    net.add_node("B")
    net.run(2.0)
    health = net.nodes["B"].endpoint.health("A")
    assert health.state(net.now) == PeerState.ALIVE
    killed_at = net.now
    net.kill("A")
    assert net.run_until(lambda: health.state(net.now) == PeerState.DEAD, until=killed_at + 1.0)
    assert health.score(net.now) == 0.0


def test_window_full_then_window_open() -> None:
    config = ProtocolConfig(window_messages=4)
    net = SimNetwork(seed=1)
    net.add_node("A", config=config)
    net.add_node("B", config=config)
    net.subscribe("B", TOPIC)
    ep = net.nodes["A"].endpoint
    for _ in range(4):
        ep.publish(TOPIC, b"x", net.now)
    assert not ep.can_publish(TOPIC)
    try:
        ep.publish(TOPIC, b"x", net.now)
    except Exception as exc:
        assert type(exc).__name__ == "WindowFull" and exc.waiting_on == ["B"]  # type: ignore[attr-defined]
    else:
        raise AssertionError("a full window must refuse the message")
    assert ep.stats.window_full == 1
    net.run(0.5)
    assert any(isinstance(e, WindowOpen) for e in net.nodes["A"].events)
    assert ep.can_publish(TOPIC)
    assert len(net.nodes["B"].delivered()) == 4


def test_64_mib_message_through_loss() -> None:
    net = SimNetwork(seed=5, faults=LinkFaults(drop=0.1, reorder=0.1, corrupt=0.01))
    net.add_node("A")
    net.add_node("B")
    payload = random.Random(5).randbytes(64 << 20)
    net.send("A", "B", "tensor", payload)
    b = net.nodes["B"]
    assert net.run_until(lambda: bool(b.delivered()), until=120.0)
    (msg,) = b.delivered()
    assert msg.payload == payload
    assert net.nodes["A"].endpoint.stats.retransmits > 0  # loss really happened


def test_late_subscriber_starts_at_sync_point() -> None:
    # The early messages fall out of retention before C subscribes: C neither gets them nor
    # hears of them as lost (within retention it would get them too: see test_join.py).
    config = ProtocolConfig(retain_seconds=0.5)
    net = SimNetwork(seed=2)
    net.add_node("A", config=config)
    net.add_node("B", config=config)
    net.add_node("C", config=config)
    net.subscribe("B", TOPIC)
    for i in range(5):
        net.publish("A", TOPIC, f"early{i}".encode())
    net.run(1.0)
    net.subscribe("C", TOPIC)
    for i in range(5):
        net.publish("A", TOPIC, f"late{i}".encode())
    net.run(2.0)
    assert [d.payload for d in net.nodes["C"].delivered()] == [
        f"late{i}".encode() for i in range(5)
    ]
    assert net.nodes["C"].gaps() == []
    assert len(net.nodes["B"].delivered()) == 10


def test_publisher_restart_is_a_new_epoch() -> None:
    net = SimNetwork(seed=3)
    net.add_node("A", epoch=1)
    net.add_node("B")
    net.subscribe("B", TOPIC)
    net.publish("A", TOPIC, b"before")
    net.run(0.5)
    net.kill("A")
    net.nodes.pop("A")
    restarted = net.add_node("A", epoch=2)
    net.publish("A", TOPIC, b"after")
    net.run(1.5)
    assert restarted.endpoint.epoch == 2
    assert [d.payload for d in net.nodes["B"].delivered()] == [b"before", b"after"]
    # An old-epoch message arriving late is counted and dropped, not delivered.
    from p2p_reliable.envelope import Envelope, Kind, encode

    stale = encode(Envelope(kind=Kind.DATA, origin="A", stream=TOPIC, epoch=1, seq=7, payload=b"x"))
    stats = net.nodes["B"].endpoint.stats
    before = stats.stale_epoch
    net.nodes["B"].endpoint.receive(stale, "A", net.now)
    assert stats.stale_epoch == before + 1
    assert len(net.nodes["B"].delivered()) == 2


def test_spoofed_origin_is_rejected() -> None:
    from p2p_reliable.envelope import Envelope, Kind, encode

    net = SimNetwork(seed=1)
    net.add_node("A")
    b = net.add_node("B")
    net.subscribe("B", TOPIC)
    forged = encode(
        Envelope(kind=Kind.DATA, origin="A", stream=TOPIC, epoch=1, seq=0, payload=b"x")
    )
    b.endpoint.receive(forged, "mallory", 0.0)
    assert b.endpoint.stats.spoofed == 1
    assert b.endpoint.next_event() is not None
    assert not [e for e in iter(b.endpoint.next_event, None) if isinstance(e, Delivered)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_garbage_never_crashes_and_is_counted(frames: list[bytes]) -> None:
    net = SimNetwork(seed=0)
    net.add_node("A")
    b = net.add_node("B")
    net.subscribe("B", TOPIC)
    ep = b.endpoint
    for i, frame in enumerate(frames):
        ep.receive(frame, "A", float(i))
        ep.handle_timer(float(i))
    stats = ep.stats
    rejected = stats.corrupted + stats.malformed
    events = list(iter(ep.next_event, None))
    assert not [e for e in events if isinstance(e, Delivered | Gap | Unrecoverable)]
    assert rejected == len([e for e in events if type(e).__name__ == "Rejected"])


@st.composite
def resealed_frames(draw: st.DrawFn) -> bytes:
    """A data envelope from A whose body was damaged and then sealed again (valid header
    and checksum): a frame that reaches the endpoint's parser and its checks."""
    env = Envelope(
        kind=draw(st.sampled_from(list(Kind))),
        origin="A",
        stream=TOPIC,
        epoch=draw(st.integers(0, 2**40)),
        seq=draw(st.integers(0, 64)),
        payload=draw(st.binary(max_size=64)),
        flags=draw(st.sampled_from([Flags.NONE, Flags.COMPRESSED, Flags.DIRECT])),
    )
    body = bytearray(encode(env)[len(MAGIC) + 1 : -8])
    pos = draw(st.integers(0, len(body) - 1))
    body[pos] ^= draw(st.integers(1, 255))
    data = MAGIC + bytes([VERSION]) + bytes(body)
    return data + xxhash.xxh3_64_digest(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(resealed_frames(), min_size=1, max_size=10))
def test_resealed_garbage_reaches_the_parser_and_is_counted(frames: list[bytes]) -> None:
    net = SimNetwork(seed=0)
    net.add_node("A")
    b = net.add_node("B")
    net.subscribe("B", TOPIC)
    ep = b.endpoint
    refused = 0
    for i, frame in enumerate(frames):
        try:
            decode(frame)
        except DecodeError:
            refused += 1
        ep.receive(frame, "A", float(i))
        ep.handle_timer(float(i))
    stats = ep.stats
    assert stats.corrupted == 0  # every checksum held: what was refused, the parser refused
    assert stats.malformed >= refused
    events = list(iter(ep.next_event, None))
    rejected = [e for e in events if type(e).__name__ == "Rejected"]
    assert len(rejected) >= refused


def test_slow_consumer_slows_the_publisher_and_loses_nothing() -> None:
    config = ProtocolConfig(flow_control=True, receive_window=8, window_messages=64)
    net = SimNetwork(seed=9, faults=LinkFaults(drop=0.1, reorder=0.1))
    net.add_node("A", config=config)
    b = net.add_node("B", config=config)
    b.auto_consume = False
    net.subscribe("B", TOPIC)
    msgs = [f"m{i}".encode() for i in range(60)]
    for m in msgs:
        net.publish("A", TOPIC, m)
    consumed: list[bytes] = []
    most_waiting = 0
    # B's application takes one message per 50 ms of virtual time.
    for _ in range(2000):
        net.run(net.now + 0.05)
        ready = b.delivered()[len(consumed) :]
        most_waiting = max(most_waiting, len(ready))
        if ready:
            consumed.append(ready[0].payload)
            b.endpoint.consumed("A", TOPIC, ready[0].end, net.now)
        if len(consumed) == len(msgs):
            break
    assert consumed == msgs
    assert b.gaps() == [] and net.nodes["A"].unrecoverable() == []
    assert most_waiting <= 8  # never more than the receive window ahead of the consumer
    assert net.nodes["A"].endpoint.stats.window_full > 0  # the publisher was held back
    assert net.now >= 60 * 0.05


def test_nodes_with_another_cluster_secret_get_nothing_in_or_out() -> None:
    from p2p_reliable.endpoint import Endpoint

    net = SimNetwork(seed=4)
    net.add_node("A")
    net.add_node("B")
    net.subscribe("A", TOPIC)
    net.subscribe("B", TOPIC)
    # Replace the endpoints with ones holding secrets: A and B share one, M has another.
    for name, secret in (("A", b"ours"), ("B", b"ours")):
        net.nodes[name].endpoint = Endpoint(name, epoch=1, cluster_secret=secret)
    intruder = net.add_node("M")
    intruder.endpoint = Endpoint("M", epoch=1, cluster_secret=b"theirs")
    for node in net.nodes.values():
        for other in net.nodes:
            if other != node.node_id:
                node.endpoint.add_peer(other, 0.0)
                node.endpoint.add_subscriber(TOPIC, other, 0.0)
        node.endpoint.subscribe(TOPIC)
    net.subscribe("M", TOPIC)
    net.publish("A", TOPIC, b"inside")
    net.publish("M", TOPIC, b"injected")
    net.run(3.0)
    a, b, m = net.nodes["A"], net.nodes["B"], net.nodes["M"]
    assert [d.payload for d in b.delivered()] == [b"inside"]
    assert a.delivered() == [] and m.delivered() == []
    for inside in (a, b):
        assert inside.endpoint.stats.auth_rejected > 0
        assert inside.endpoint.health("M").snapshot(net.now).rejections
    assert m.endpoint.stats.auth_rejected > 0  # and the intruder hears nothing either


def test_two_runs_of_one_identity_are_told_apart_from_a_restart() -> None:
    net = SimNetwork(seed=5)
    net.add_node("A", epoch=1)
    b = net.add_node("B")
    net.subscribe("B", TOPIC)
    net.subscribe("A", TOPIC)
    net.publish("A", TOPIC, b"x")
    net.publish("B", TOPIC, b"y")  # B's acks to A carry A's epoch: not a second run of B
    net.run(1.0)
    assert b.endpoint.duplicate_origins(net.now) == []
    assert net.nodes["A"].endpoint.duplicate_origins(net.now) == []
    # A second live "A" (a cloned key) with another epoch: both keep heartbeating B.
    from p2p_reliable.endpoint import Endpoint

    twin = Endpoint("A", epoch=2)
    twin.add_peer("B", net.now)
    for _ in range(5):
        twin.handle_timer(net.now)
        for tx in twin.datagrams_to_send(net.now):
            b.endpoint.receive(tx.data, "A", net.now)
        net.run(net.now + 0.2)
    assert b.endpoint.duplicate_origins(net.now) == ["A"]
