"""Join semantics: a subscriber the publisher learns of late loses nothing published after it
subscribed, or is told of it with a Gap; retention stays within its bounds throughout."""

from __future__ import annotations

import math

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_reliable import DecodeError, Delivered, Gap, KiB, ProtocolConfig, RetryPolicy
from p2p_reliable.control import (
    MAX_EVICTION_MARKS,
    EvictionMark,
    SyncInfo,
    decode_sync,
    encode_sync,
)
from p2p_reliable.endpoint import Endpoint
from p2p_reliable.envelope import Envelope, Kind, encode
from p2p_reliable.losses import EVICTED, NOT_REPAIRED
from p2p_reliable.retention import EvictionHistory
from p2p_reliable.testing import LinkFaults, SimNetwork

TOPIC = "t"
RETAIN = 1.0
# Small fragments so that faults hit parts of messages; retries outlast every fault below.
JOIN = ProtocolConfig(
    max_fragment_payload=256,
    max_frame_bytes=1 * KiB,
    compress_threshold=512,
    max_message_size=64 * KiB,
    window_messages=16,
    retry=RetryPolicy(base=0.05, min_rto=0.02, cap=1.0, max_attempts=40),
    retain_seconds=RETAIN,
)
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the SYNC payload ----------------------------------------------------------------------


@st.composite
def sync_infos(draw: st.DrawFn) -> tuple[int, SyncInfo]:
    floor = draw(st.integers(0, 1 << 40))
    next_seq = floor + draw(st.integers(0, 1 << 20))
    seqs = sorted(draw(st.sets(st.integers(0, max(floor - 1, 0)), max_size=MAX_EVICTION_MARKS)))
    seqs = [s for s in seqs if s < floor]
    ages = sorted(draw(st.lists(st.integers(0, 1 << 50), min_size=len(seqs), max_size=len(seqs))))
    marks = tuple(EvictionMark(s, a) for s, a in zip(seqs, reversed(ages), strict=True))
    return floor, SyncInfo(next_seq=next_seq, marks=marks)


@settings(max_examples=200, deadline=None)
@given(sync_infos())
def test_sync_payload_round_trips(case: tuple[int, SyncInfo]) -> None:
    floor, info = case
    data = encode_sync(info)
    assert decode_sync(data, floor) == info
    assert len(data) < 1024  # bounded, whatever the history


def test_sync_without_payload_has_no_history() -> None:
    assert decode_sync(b"", 7) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgpack.packb({"next": 9}),
        msgpack.packb([9]),
        msgpack.packb([9, [], 0]),
        msgpack.packb(["9", []]),
        msgpack.packb([-1, []]),
        msgpack.packb([9.0, []]),
        msgpack.packb([True, []]),
        msgpack.packb([4, []]),  # next_seq below the floor
        msgpack.packb([(1 << 64) - 1, []]),  # beyond any valid sequence number
        msgpack.packb([9, "marks"]),
        msgpack.packb([9, [[1]]]),
        msgpack.packb([9, [[1, 2, 3]]]),
        msgpack.packb([9, [[1, -2]]]),
        msgpack.packb([9, [["1", 2]]]),
        msgpack.packb([9, [[5, 2]]]),  # a mark at the floor
        msgpack.packb([9, [[2, 9], [1, 5]]]),  # seqs going down
        msgpack.packb([9, [[1, 9], [1, 5]]]),  # a repeated seq
        msgpack.packb([9, [[1, 5], [2, 9]]]),  # ages going up
    ],
)
def test_malformed_sync_payload_is_refused(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_sync(payload, 5)


def test_a_sync_with_too_many_marks_is_refused() -> None:
    marks = [[i, 0] for i in range(MAX_EVICTION_MARKS + 1)]
    assert decode_sync(msgpack.packb([40, marks[:-1]]), 40) is not None
    with pytest.raises(DecodeError):
        decode_sync(msgpack.packb([40, marks]), 40)


def test_malformed_sync_is_counted_and_changes_nothing() -> None:
    ep = Endpoint("B", epoch=1)
    ep.subscribe(TOPIC, 0.0)
    bad = Envelope(kind=Kind.SYNC, origin="A", stream=TOPIC, epoch=1, seq=5, payload=b"\x93")
    ep.receive(encode(bad), "A", 0.0)
    assert ep.stats.malformed == 1
    assert ep.inbound("A", TOPIC) is None
    assert type(ep.next_event()).__name__ == "Rejected"


# -- the eviction history ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.floats(0.0, 2.0)), max_size=120))
def test_eviction_history_stays_bounded_and_never_too_narrow(
    runs: list[tuple[int, float]],
) -> None:
    history = EvictionHistory()
    evicted: list[tuple[int, float]] = []  # (seq, publish time) of every evicted seq
    seq, now = 0, 0.0
    for count, pause in runs:
        now += pause
        history.note(seq, now)
        evicted += [(s, now) for s in range(seq, seq + count)]
        seq += count
        marks = history.entries()
        assert len(marks) <= MAX_EVICTION_MARKS
        assert marks[0][0] == 0  # the marks cover everything evicted
        assert [m[0] for m in marks] == sorted({m[0] for m in marks})
        assert [m[1] for m in marks] == sorted(m[1] for m in marks)
        for s, published in evicted:
            covering = max(m for m in marks if m[0] <= s)
            assert covering[1] >= published  # reported no older than it is


def test_eviction_history_merges_the_runs_closest_in_time() -> None:
    history = EvictionHistory(limit=3)
    for seq, t in ((0, 0.0), (1, 5.0), (2, 5.5), (3, 9.0)):
        history.note(seq, t)
    assert history.entries() == [(0, 0.0), (1, 5.5), (3, 9.0)]
    history.note(4, 9.1)
    assert history.entries() == [(0, 0.0), (1, 5.5), (3, 9.1)]
    assert [m.age_us for m in history.marks(10.0)] == [10_000_000, 4_500_000, 900_000]


# -- retention bounds ----------------------------------------------------------------------


def _retention_ok(ep: Endpoint) -> bool:
    cfg = ep.config
    logs = ep.retention.members
    assert ep.retention.bytes == sum(log.retained_bytes for log in logs)
    assert ep.retention.bytes <= cfg.retain_total_bytes
    for log in logs:
        assert log.retained_bytes <= cfg.retain_bytes
        assert log.retained_messages <= cfg.retain_messages
        assert len(log.history) <= MAX_EVICTION_MARKS
    return True


def test_retention_keeps_messages_for_retain_seconds_within_its_bounds() -> None:
    config = ProtocolConfig(retain_seconds=1.0, retain_bytes=10 * KiB, retain_messages=6)
    ep = Endpoint("A", epoch=1, config=config)
    for i in range(4):
        ep.publish(TOPIC, bytes(1000), 0.1 * i)
    log = ep.outbound(TOPIC).log  # type: ignore[union-attr]
    assert (log.floor, log.retained_messages) == (0, 4)
    assert 4000 < log.retained_bytes < 4200  # the encoded envelopes held
    ep.outbound(TOPIC).expire(1.05)  # type: ignore[union-attr]
    assert log.floor == 1  # the first is 1.05 s old, the others not yet 1 s
    for i in range(20):
        ep.publish(TOPIC, bytes(3000 if i % 2 else 10), 1.1)
        assert _retention_ok(ep)
    assert log.retained_bytes <= 10 * KiB and log.retained_messages <= 6
    assert log.floor == log.next_seq - log.retained_messages
    assert log.history.entries()[0][0] == 0


def test_total_retention_evicts_the_oldest_over_all_topics() -> None:
    config = ProtocolConfig(retain_bytes=9 * KiB, retain_total_bytes=12 * KiB)
    ep = Endpoint("A", epoch=1, config=config)
    for _ in range(8):
        ep.publish("old", bytes(1000), 0.0)
    for i in range(8):
        ep.publish("new", bytes(1000), 1.0 + i)
        assert _retention_ok(ep)
    old, new = ep.outbound("old").log, ep.outbound("new").log  # type: ignore[union-attr]
    # The old topic gave way, and nothing of the new one went.
    assert 0 < old.retained_messages < 8 and old.floor == 8 - old.retained_messages
    assert (new.retained_messages, new.floor) == (8, 0)


def test_unacked_messages_stay_and_direct_streams_retain_nothing() -> None:
    config = ProtocolConfig(retain_bytes=1 * KiB)
    net = SimNetwork(seed=1)
    net.add_node("A", config=config)
    net.add_node("B", config=config)
    net.subscribe("B", TOPIC)
    net.partition("A", "B", 0.0, None)  # B never acks
    a = net.nodes["A"].endpoint
    for _ in range(4):
        a.publish(TOPIC, bytes(800), net.now)
        a.send("B", "direct", bytes(800), net.now)
    log = a.outbound(TOPIC).log  # type: ignore[union-attr]
    assert log.retained_bytes == 0 and log.floor == 0  # all owed to B: none is evicted
    net.partitions.clear()
    assert net.run_until(lambda: a.unacked() == 0, until=10.0)
    assert log.retained_bytes <= 1 * KiB and log.floor == 3  # now the bounds apply
    direct = a._directs[("B", "direct")].log
    assert direct.retained_messages == 0 and direct.floor == direct.next_seq == 4


# -- late joiners over the simulated network -----------------------------------------------


@attrs.frozen
class JoinCase:
    seed: int
    faults: LinkFaults
    before: int  # messages published before C subscribes
    after: int  # messages published after
    spacing: float
    learned_after: float  # how late the publisher learns of C
    gossip_early: bool  # whether C hears the topic before the publisher knows of it


def _payload(i: int) -> bytes:
    return b"m%d:" % i + bytes(i * 37 % 700)  # 0-3 fragments


def _run_join(case: JoinCase, config: ProtocolConfig) -> tuple[SimNetwork, float, list[int]]:
    """A publishes on TOPIC to B, C subscribes at `subscribed` and A learns of it late.

    Returns the net (run until C has settled every sequence number A sent), the subscription
    time, and the sequence numbers owed to C (published after it subscribed).
    """
    net = SimNetwork(seed=case.seed, faults=case.faults)
    for name in "ABC":
        net.add_node(name, config=config)
    net.subscribe("B", TOPIC)
    subscribed = case.before * case.spacing + 0.01
    for i in range(case.before + case.after):
        when = i * case.spacing + (0.02 if i >= case.before else 0.0)
        net.at(when, lambda i=i: net.publish("A", TOPIC, _payload(i)))
    net.at(subscribed, lambda: net.subscribe("C", TOPIC, learned_after=case.learned_after))
    if not case.gossip_early:
        net.partition("A", "C", subscribed, subscribed + case.learned_after, one_way=True)
    a, c = net.nodes["A"], net.nodes["C"]
    total = case.before + case.after

    def settled() -> bool:
        assert _retention_ok(a.endpoint)  # at every step
        rcv = c.endpoint.inbound("A", TOPIC)
        sender = a.endpoint.outbound(TOPIC)
        if len(a.published) < total or rcv is None or sender is None:
            return False
        return rcv.synced and rcv.next >= sender.next_seq

    last = (total + 1) * case.spacing + case.learned_after
    bound = last + config.retry.max_span() + config.effective_gap_timeout + 5.0
    assert net.run_until(settled, until=bound), f"C not settled at t={net.now}"
    net.run(net.now + 2.0)  # late duplicates and repairs must not deliver anything twice
    assert _retention_ok(a.endpoint)
    owed = [seq for t, _, _, seq in a.published if t > subscribed]
    return net, subscribed, owed


def _check_order_and_payloads(net: SimNetwork) -> tuple[set[int], set[int]]:
    """C's events follow the stream in order, each seq once; returns (delivered, in a Gap)."""
    a, c = net.nodes["A"], net.nodes["C"]
    payloads = {seq: _payload(i) for i, (_, _, _, seq) in enumerate(a.published)}
    delivered: set[int] = set()
    gapped: set[int] = set()
    position = -1
    for event in c.events:
        if isinstance(event, Delivered):
            assert event.seq > position
            assert event.payload == payloads[event.seq]
            delivered.add(event.seq)
            position = event.end - 1
        elif isinstance(event, Gap):
            assert event.start > position
            gapped.update(range(event.start, event.stop))
            position = event.stop - 1
    return delivered, gapped


faults = st.builds(
    LinkFaults,
    drop=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.3),
    reorder=st.floats(0.0, 0.3),
)


def _cases(learned_after: st.SearchStrategy[float]) -> st.SearchStrategy[JoinCase]:
    return st.builds(
        JoinCase,
        seed=st.integers(0, 2**32),
        faults=faults,
        before=st.integers(0, 15),
        after=st.integers(1, 15),
        spacing=st.floats(0.01, 0.2),
        learned_after=learned_after,
        gossip_early=st.booleans(),
    )


@SETTINGS
@given(_cases(st.floats(0.0, RETAIN)))
def test_a_subscriber_learned_of_within_retention_gets_everything_since_it_subscribed(
    case: JoinCase,
) -> None:
    net, _, owed = _run_join(case, JOIN)
    delivered, gapped = _check_order_and_payloads(net)
    assert set(owed) <= delivered
    assert not set(owed) & gapped


@SETTINGS
@given(
    case=_cases(st.floats(RETAIN, 3 * RETAIN)),
    retain_bytes=st.sampled_from([300, 2 * KiB, 64 * KiB]),
)
def test_past_retention_every_message_owed_is_delivered_or_in_a_gap(
    case: JoinCase, retain_bytes: int
) -> None:
    config = attrs.evolve(JOIN, retain_bytes=retain_bytes)
    net, _, owed = _run_join(case, config)
    delivered, gapped = _check_order_and_payloads(net)
    assert set(owed) <= delivered | gapped  # nothing owed is silently lost
    assert not delivered & gapped


@SETTINGS
@given(_cases(st.floats(0.0, RETAIN)))
def test_a_byte_bound_forced_small_still_loses_nothing_silently(case: JoinCase) -> None:
    config = attrs.evolve(JOIN, retain_bytes=400, retain_messages=3)
    net, _, owed = _run_join(case, config)
    delivered, gapped = _check_order_and_payloads(net)
    assert set(owed) <= delivered | gapped


def test_late_subscriber_within_retention_gets_earlier_messages_too() -> None:
    net = SimNetwork(seed=2)
    for name in "ABC":
        net.add_node(name)
    net.subscribe("B", TOPIC)
    for i in range(5):
        net.publish("A", TOPIC, b"early%d" % i)
    net.run(1.0)
    net.subscribe("C", TOPIC, learned_after=0.5)
    for i in range(3):
        net.publish("A", TOPIC, b"late%d" % i)
    net.run(3.0)
    c = net.nodes["C"]
    expected = [b"early%d" % i for i in range(5)] + [b"late%d" % i for i in range(3)]
    assert [d.payload for d in c.delivered()] == expected  # a superset, in order
    assert c.gaps() == []


def test_lost_past_retention_is_one_gap_from_the_first_message_owed() -> None:
    net = SimNetwork(seed=7)
    for name in "ABC":
        net.add_node(name, config=JOIN)
    net.subscribe("B", TOPIC)
    for i in range(40):  # seqs 0-9 before C subscribes at 1.0, 10-39 after, 0.1 s apart
        net.at(0.05 + 0.1 * i + (0.02 if i >= 10 else 0.0), lambda: net.publish("A", TOPIC, b"x"))
    net.at(1.0, lambda: net.subscribe("C", TOPIC, learned_after=2.5))
    net.partition("A", "C", 1.0, 3.5, one_way=True)
    net.run(8.0)
    c = net.nodes["C"]
    # At 3.5 everything published before 2.5 (seqs up to 24) had fallen out of retention.
    (gap,) = c.gaps()
    assert (gap.start, gap.stop, gap.reason) == (10, 25, EVICTED)
    assert [d.seq for d in c.delivered()] == list(range(25, 40))


def test_the_election_message_after_a_connection_is_not_lost() -> None:
    # Issue 12: C heard seq 0 by gossip, lost seq 1, and its acks had not reached A yet when A
    # learned of the subscription; A's SYNC used to say "from seq 2" and C gave seq 1 up.
    net = SimNetwork(seed=3)
    for name in "ABC":
        net.add_node(name)
    net.subscribe("B", TOPIC)
    net.subscribe("C", TOPIC, learned_after=0.5)
    net.partition("C", "A", 0.0, 0.5, one_way=True)
    net.partition("A", "C", 0.15, 0.25, one_way=True)
    net.publish("A", TOPIC, b"connection")
    net.at(0.2, lambda: net.publish("A", TOPIC, b"election"))
    net.run(2.0)
    c = net.nodes["C"]
    assert [d.payload for d in c.delivered()] == [b"connection", b"election"]
    assert c.gaps() == []


def _reconnect(net: SimNetwork, a: str, b: str, down: float, up: float) -> None:
    net.partition(a, b, down, up)

    def drop() -> None:
        for x, y in ((a, b), (b, a)):
            net.nodes[x].endpoint.remove_peer(y, net.now)

    def restore() -> None:
        for x, y in ((a, b), (b, a)):
            net.nodes[x].endpoint.add_peer(y, net.now)
        net.nodes[a].endpoint.add_subscriber(TOPIC, b, net.now)

    net.at(down, drop)
    net.at(up, restore)


def _resubscribe(net: SimNetwork, publisher: str, node: str, down: float, up: float) -> None:
    def leave() -> None:
        net.nodes[node].endpoint.unsubscribe(TOPIC)
        net.nodes[publisher].endpoint.remove_subscriber(TOPIC, node, net.now)

    def rejoin() -> None:
        net.nodes[node].endpoint.subscribe(TOPIC, net.now)
        net.nodes[publisher].endpoint.add_subscriber(TOPIC, node, net.now)

    net.at(down, leave)
    net.at(up, rejoin)


@pytest.mark.parametrize("rejoin", [_reconnect, _resubscribe])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_receiver_added_again_delivers_nothing_twice(rejoin: object, seed: int) -> None:
    net = SimNetwork(seed=seed, faults=LinkFaults(drop=0.2, duplicate=0.2, reorder=0.2))
    for name in "AB":
        net.add_node(name, config=JOIN)
    net.subscribe("B", TOPIC)
    for i in range(30):
        net.at(0.05 * i, lambda i=i: net.publish("A", TOPIC, b"m%d" % i))
    rejoin(net, "A", "B", 0.5, 0.9)  # type: ignore[operator]
    net.run(20.0)
    b = net.nodes["B"]
    payloads = [d.payload for d in b.delivered()]
    assert len(payloads) == len(set(payloads))  # exactly once
    seqs = [d.seq for d in b.delivered()]
    assert seqs == sorted(seqs)
    # Everything published from the return on arrived; within retention, the rest too.
    assert payloads == [b"m%d" % i for i in range(30)]
    assert b.gaps() == []


def test_subscribing_without_a_time_owes_everything_it_was_not_given() -> None:
    ep = Endpoint("C", epoch=1)
    ep.subscribe(TOPIC)
    info = SyncInfo(next_seq=12, marks=(EvictionMark(0, 50_000_000), EvictionMark(4, 10)))
    sync = Envelope(kind=Kind.SYNC, origin="A", stream=TOPIC, epoch=1, seq=8, payload=b"")
    ep.receive(encode(attrs.evolve(sync, payload=encode_sync(info))), "A", 100.0)
    (gap,) = [e for e in iter(ep.next_event, None) if isinstance(e, Gap)]
    assert (gap.start, gap.stop, gap.reason) == (0, 8, EVICTED)
    rcv = ep.inbound("A", TOPIC)
    assert rcv is not None and rcv.owed_since == -math.inf and rcv.high_water == 12


def test_a_sync_without_history_keeps_the_old_meaning() -> None:
    ep = Endpoint("C", epoch=1)
    ep.subscribe(TOPIC, 0.0)
    publisher = Endpoint("A", epoch=1)
    publisher.publish(TOPIC, b"a", 1.0)
    for tx in publisher.datagrams_to_send(1.0):
        ep.receive(tx.data, "A", 1.0)
    sync = Envelope(kind=Kind.SYNC, origin="A", stream=TOPIC, epoch=1, seq=3, payload=b"")
    ep.receive(encode(sync), "A", 1.1)
    gaps = [e for e in iter(ep.next_event, None) if isinstance(e, Gap)]
    assert [(g.start, g.stop, g.reason) for g in gaps] == [(1, 3, NOT_REPAIRED)]
