"""Receive bounds of the protocol core: what a peer that ignores them can make a node hold.

Sans-IO: endpoints driven directly or through the simulated network, in virtual time. Each
test plays one row of issue 13 (a publisher ignoring credit, a decompression bomb, thousands
of stream names) and checks that the node refuses and counts it, stays within its byte
budgets at every step, frees what the attacker left, and still serves honest traffic.
"""

from __future__ import annotations

import random

import attrs
import pytest
import xxhash
import zstandard

from p2p_reliable import (
    Delivered,
    Endpoint,
    Flags,
    Gap,
    KiB,
    MiB,
    ProtocolConfig,
    Rejected,
    WindowFull,
)
from p2p_reliable.envelope import Envelope, Kind, encode
from p2p_reliable.inbound import TOO_MANY_DIRECT_STREAMS, TOO_MANY_STREAMS
from p2p_reliable.receiver import DECOMPRESSION_OVER_CREDIT, OVER_CREDIT
from p2p_reliable.testing import LinkFaults, SimNetwork

SMALL = ProtocolConfig(
    flow_control=True,
    peer_receive_bytes=256 * KiB,
    total_receive_bytes=1 * MiB,
    max_message_size=1 * MiB,
)


def _within_budgets(ep: Endpoint) -> bool:
    """The budget's running account matches what the receivers hold, within the bounds."""
    budget, cfg = ep.budget, ep.config
    held: dict[str, int] = {}
    for key in ep.streams.keys():
        rcv = ep.streams.get(key)
        assert rcv is not None
        held[key[0]] = held.get(key[0], 0) + rcv.held_bytes()
    for origin, amount in held.items():
        assert budget.used(origin) == amount
        assert amount <= cfg.peer_receive_bytes + budget.slack
    assert budget.total == sum(held.values()) <= cfg.total_receive_bytes + budget.slack
    return True


def _events(ep: Endpoint) -> list[object]:
    return list(iter(ep.next_event, None))


def _ignore_credit(
    net: SimNetwork, node: str, peer: str, stream: str, mp: pytest.MonkeyPatch
) -> None:
    """Make `node` a publisher that sends on `stream` whatever credit `peer` gives it."""
    ep = net.nodes[node].endpoint
    ep.send(peer, stream, b"first", net.now)
    mp.setattr(ep._directs[(peer, stream)], "blocking_receivers", lambda size: [])


# -- row 3: a publisher that ignores the credit it was given --------------------------------


def test_a_publisher_beyond_its_sequence_credit_is_refused_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = attrs.evolve(SMALL, receive_window=8)
    net = SimNetwork(seed=1, faults=LinkFaults(jitter=0.0))  # in order: seq 0 comes first
    net.add_node("A", config=config)
    b = net.add_node("B", config=config)
    b.auto_consume = False  # nobody reads: credit never grows
    _ignore_credit(net, "A", "B", "flood", monkeypatch)
    for _ in range(200):
        net.send("A", "B", "flood", random.Random(1).randbytes(16 * KiB))
    net.run_until(lambda: not _within_budgets(b.endpoint), until=3.0)
    stats = b.endpoint.stats
    assert len(b.delivered()) == 8  # the credit it advertised, not one more
    assert stats.over_credit > 0
    refused = [e for e in b.rejected() if e.reason == OVER_CREDIT]
    assert len(refused) == stats.over_credit and {e.peer for e in refused} == {"A"}
    assert b.endpoint.health("A").rejections[OVER_CREDIT] == stats.over_credit
    # Buffered within the budget (some came before seq 0 told where the stream starts), and
    # the 8 messages delivered on top: the application was given them.
    delivered = sum(len(d.payload) + 256 for d in b.delivered())
    assert b.endpoint.budget.used("A") <= config.peer_receive_bytes + delivered


def test_a_forged_fragment_index_does_not_buy_credit() -> None:
    b = Endpoint("B", epoch=1, config=attrs.evolve(SMALL, receive_window=8))
    body = b.codec.split(b"x").pieces[0]
    b.receive(_direct("A", "d", 0, body), "A", 0.0)  # synced: credit up to seq 8
    forged = Envelope(
        kind=Kind.FRAGMENT,
        origin="A",
        stream="d",
        epoch=1,
        seq=5000,
        payload=b"y" * 100,
        frag_index=4999,  # "my message started at seq 1"
        frag_count=5000,
        flags=Flags.DIRECT,
    )
    b.receive(encode(forged), "A", 0.1)
    assert [e.reason for e in _events(b) if isinstance(e, Rejected)] == [OVER_CREDIT]
    assert b.stats.over_credit == 1 and _within_budgets(b)
    assert b.budget.used("A") == 1 + 256  # only the delivered b"x", not yet consumed


def test_a_flood_within_sequence_credit_is_bounded_by_bytes_and_not_called_hostile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = SimNetwork(seed=2)
    a = net.add_node("A", config=SMALL)
    b = net.add_node("B", config=SMALL)
    b.auto_consume = False
    _ignore_credit(net, "A", "B", "flood", monkeypatch)
    payloads = [random.Random(i).randbytes(16 * KiB) for i in range(300)]  # 4.7 MiB
    for payload in payloads:
        net.send("A", "B", "flood", payload)
    net.run_until(lambda: not _within_budgets(b.endpoint), until=3.0)
    stats = b.endpoint.stats
    assert stats.budget_drops > 0 and stats.over_credit == 0
    assert b.rejected() == []  # flow, not hostility: no Rejected for the router to count
    # The budget, and at most one head-of-line message over it (nothing was unconsumed when
    # the first arrived, so it took the peer's exception).
    assert b.endpoint.budget.used("A") <= SMALL.peer_receive_bytes + 16 * KiB + 512
    # Once the application reads, delivery goes on until the flooder gives up what it kept
    # resending into a full budget: every message is delivered once, in order, or reported.
    b.auto_consume = True
    for d in b.delivered():
        b.endpoint.consumed("A", "flood", d.end, net.now, direct=True)
    before = len(b.delivered())
    settled = net.run_until(lambda: a.endpoint.unacked() == 0, until=300.0)
    net.run(net.now + SMALL.effective_gap_timeout + 1.0)
    assert settled and _within_budgets(b.endpoint)
    assert len(b.delivered()) > before
    sent = dict(enumerate([b"first", *payloads]))
    covered = [d.seq for d in b.delivered()] + [s for g in b.gaps() for s in range(g.start, g.stop)]
    assert sorted(covered) == list(sent) and len(set(covered)) == len(covered)
    assert all(d.payload == sent[d.seq] for d in b.delivered())
    assert {u.seq for u in a.unrecoverable()} >= {
        s for g in b.gaps() for s in range(g.start, g.stop)
    }
    assert b.rejected() == []


def test_what_a_departed_flooder_left_is_freed_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    net = SimNetwork(seed=3)
    net.add_node("A", config=SMALL)
    b = net.add_node("B", config=SMALL)
    b.auto_consume = False
    _ignore_credit(net, "A", "B", "flood", monkeypatch)
    for i in range(100):
        net.send("A", "B", "flood", random.Random(i).randbytes(16 * KiB))
    net.run(1.0)
    assert b.endpoint.budget.used("A") > 0  # delivered, never consumed
    net.kill("A")
    b.endpoint.remove_peer("A", net.now)
    net.run(net.now + SMALL.idle_stream_timeout + 1.0)
    assert b.endpoint.budget.used("A") == 0 and b.endpoint.budget.total == 0
    assert b.endpoint.inbound("A", "flood", direct=True) is None


def _exchange(a: Endpoint, b: Endpoint, now: float) -> list[object]:
    """Run both endpoints' timers and carry every frame both ways until quiet; b's events."""
    events: list[object] = []
    for _ in range(20):
        a.handle_timer(now)
        b.handle_timer(now)
        frames = [(tx, b, "A") for tx in a.datagrams_to_send(now)]
        frames += [(tx, a, "B") for tx in b.datagrams_to_send(now)]
        for tx, dst, src in frames:
            dst.receive(tx.data, src, now)
        events += _events(b)
        if not frames:
            break
    return events


def test_a_publisher_holds_back_what_the_receivers_budget_for_it_cannot_take() -> None:
    a = Endpoint("A", epoch=1, config=SMALL)
    b = Endpoint("B", epoch=1, config=SMALL)
    a.add_peer("B", 0.0)
    b.add_peer("A", 0.0)
    first, second = random.Random(6).randbytes(200 * KiB), random.Random(7).randbytes(100 * KiB)
    a.send("B", "x", first, 0.0)
    # Another stream to the same receiver shares its budget for A: 300 KiB > 256 KiB.
    assert not a.can_send("B", "y", len(second)) and a.can_send("C", "y", len(second))
    with pytest.raises(WindowFull):
        a.send("B", "y", second, 0.0)
    (delivered,) = [e for e in _exchange(a, b, 0.01) if isinstance(e, Delivered)]
    assert not a.can_send("B", "y", len(second))  # delivered is not consumed
    b.consumed("A", "x", delivered.end, 0.02, direct=True)
    _exchange(a, b, 0.02)
    assert any(type(e).__name__ == "WindowOpen" for e in _events(a))
    a.send("B", "y", second, 0.03)
    events = _exchange(a, b, 0.03)
    assert [e.payload for e in events if isinstance(e, Delivered)] == [second]
    assert b.stats.budget_drops == 0 and not [e for e in events if isinstance(e, Rejected)]


# -- row 4: decompression ----------------------------------------------------------------


class _CountingDecompressor:
    """Wraps a zstd decompressor to count how often anything was decompressed."""

    def __init__(self, inner: zstandard.ZstdDecompressor) -> None:
        self.inner = inner
        self.calls = 0

    def decompress(self, data: bytes, max_output_size: int = 0) -> bytes:
        self.calls += 1
        out: bytes = self.inner.decompress(data, max_output_size=max_output_size)
        return out


def _bomb(declared: int) -> bytes:
    """A message body (zstd of `declared` zero bytes plus its digest): a few KiB."""
    compressor = zstandard.ZstdCompressor().compressobj(size=declared)
    digest = xxhash.xxh3_64()
    chunk = bytes(1 * MiB)
    parts = []
    for _ in range(declared // len(chunk)):
        parts.append(compressor.compress(chunk))
        digest.update(chunk)
    parts.append(compressor.flush())
    return b"".join(parts) + digest.digest()


def test_a_decompression_bomb_is_refused_before_anything_is_allocated() -> None:
    b = Endpoint("B", epoch=1, config=SMALL)
    spy = _CountingDecompressor(b.codec._decompressor)
    b.codec._decompressor = spy  # type: ignore[assignment]
    body = _bomb(128 * MiB)
    assert len(body) < 16 * KiB
    assert zstandard.frame_content_size(body[:-8]) == 128 * MiB
    bomb = Envelope(
        kind=Kind.DATA,
        origin="A",
        stream="d",
        epoch=1,
        seq=0,
        payload=body,
        flags=Flags.COMPRESSED | Flags.DIRECT,
    )
    b.receive(encode(bomb), "A", 0.0)
    events = _events(b)
    assert spy.calls == 0  # refused on the size its header declares
    assert not [e for e in events if isinstance(e, Delivered)]
    assert [e.reason for e in events if isinstance(e, Rejected)] == [DECOMPRESSION_OVER_CREDIT]
    (gap,) = [e for e in events if isinstance(e, Gap)]
    assert (gap.start, gap.stop) == (0, 1) and DECOMPRESSION_OVER_CREDIT in gap.reason
    assert b.stats.decompression_refused == 1
    assert b.budget.total == 0


def test_join_checks_the_declared_size_against_its_cap_first() -> None:
    b = Endpoint("B", epoch=1, config=SMALL)
    spy = _CountingDecompressor(b.codec._decompressor)
    b.codec._decompressor = spy  # type: ignore[assignment]
    body = _bomb(2 * MiB)
    with pytest.raises(Exception, match="declares 2097152 bytes"):
        b.codec.join([body], Flags.COMPRESSED, max_size=1 * MiB)
    assert spy.calls == 0


def test_compressed_messages_within_credit_arrive_and_large_ones_travel_uncompressed() -> None:
    net = SimNetwork(seed=5, faults=LinkFaults(drop=0.1, reorder=0.1))
    a = net.add_node("A", config=SMALL)
    b = net.add_node("B", config=SMALL)
    small = b"ab" * (50 * KiB)  # 100 KiB: compressed, within B's 256 KiB for A
    large = b"cd" * (400 * KiB)  # 800 KiB: more than an empty budget takes, so as it is
    assert a.endpoint.codec.split(small).flags & Flags.COMPRESSED
    assert not a.endpoint.codec.split(large).flags & Flags.COMPRESSED
    for payload in (small, large, small):
        net.send("A", "B", "d", payload)
    assert net.run_until(lambda: len(b.delivered()) == 3, until=30.0)
    assert [d.payload for d in b.delivered()] == [small, large, small]
    # A held `large` back until B had consumed `small` (B's budget is its whole window).
    assert a.endpoint.stats.window_full > 0
    stats = b.endpoint.stats
    assert stats.decompression_refused == stats.budget_drops == stats.credit_stalls == 0
    assert b.rejected() == [] and _within_budgets(b.endpoint)


def test_a_compressed_message_over_the_credit_left_waits_for_the_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = SimNetwork(seed=4)
    net.add_node("A", config=SMALL)
    b = net.add_node("B", config=SMALL)
    b.auto_consume = False
    _ignore_credit(net, "A", "B", "d", monkeypatch)  # A disregards B's byte credit
    held = random.Random(4).randbytes(150 * KiB)
    packed = bytes(200 * KiB)  # compresses to almost nothing, declares 200 KiB
    net.send("A", "B", "d", held)
    net.send("A", "B", "d", packed)
    net.run(1.0)
    assert [d.payload for d in b.delivered()] == [b"first", held]
    assert b.endpoint.stats.credit_stalls == 1 and b.rejected() == []
    for d in b.delivered():
        b.endpoint.consumed("A", "d", d.end, net.now, direct=True)
    net.run(net.now + 0.01)  # (the simulated application collects its events)
    assert [d.payload for d in b.delivered()] == [b"first", held, packed]
    assert b.gaps() == [] and _within_budgets(b.endpoint)


def test_a_message_still_waiting_for_credit_when_its_publisher_leaves_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = SimNetwork(seed=4)
    net.add_node("A", config=SMALL)
    b = net.add_node("B", config=SMALL)
    b.auto_consume = False
    _ignore_credit(net, "A", "B", "d", monkeypatch)
    net.send("A", "B", "d", random.Random(4).randbytes(150 * KiB))
    net.send("A", "B", "d", bytes(200 * KiB))
    net.run(1.0)
    assert b.endpoint.stats.credit_stalls == 1
    net.kill("A")
    b.endpoint.remove_peer("A", net.now)
    net.run(net.now + SMALL.idle_stream_timeout + 1.0)
    (gap,) = b.gaps()
    assert (gap.start, gap.stop, gap.reason) == (2, 3, "publisher left")
    assert b.endpoint.budget.total == 0 and len(b.endpoint.streams) == 0


# -- row 7: thousands of stream names ----------------------------------------------------


def _direct(origin: str, stream: str, seq: int, body: bytes) -> bytes:
    return encode(
        Envelope(
            kind=Kind.DATA,
            origin=origin,
            stream=stream,
            epoch=1,
            seq=seq,
            payload=body,
            flags=Flags.DIRECT,
        )
    )


def test_direct_stream_names_per_peer_are_capped_counted_and_freed() -> None:
    b = Endpoint("B", epoch=1, config=SMALL)
    b.add_peer("A", 0.0)
    body = b.codec.split(b"x").pieces[0]
    for i in range(5000):
        b.receive(_direct("A", f"s{i}", 0, body), "A", 0.001 * i)
    cap = SMALL.max_direct_streams_per_peer
    events = _events(b)
    assert len([e for e in events if isinstance(e, Delivered)]) == cap
    refused = [e for e in events if isinstance(e, Rejected)]
    assert len(refused) == 5000 - cap == b.stats.too_many_streams
    assert {e.reason for e in refused} == {TOO_MANY_DIRECT_STREAMS}
    assert b.streams.directs_of("A") == cap
    for d in [e for e in events if isinstance(e, Delivered)]:  # the application reads
        b.consumed("A", d.stream, d.end, 5.0, direct=True)
    # Idle for idle_stream_timeout: freed down to resume points.
    later = 5.0 + SMALL.idle_stream_timeout + 1.0
    b.handle_timer(later)
    assert len(b.streams) == 0 and b.stats.receivers_freed == cap
    assert len(b.streams.points) == cap <= SMALL.resume_points_per_peer
    # And a new name has room again.
    b.receive(_direct("A", "new", 0, body), "A", later)
    assert [e.stream for e in _events(b) if isinstance(e, Delivered)] == ["new"]


def test_get_timer_reads_only_what_changed_however_many_streams_exist() -> None:
    config = attrs.evolve(
        SMALL, flow_control=False, max_direct_streams_per_peer=8000, max_inbound_streams=8000
    )
    b = Endpoint("B", epoch=1, config=config)
    b.add_peer("A", 0.0)
    body = b.codec.split(b"x").pieces[0]
    reads_per_call = []
    for i in range(5000):
        now = 0.001 * i
        b.receive(_direct("A", f"s{i}", 0, body), "A", now)
        before = b.timers.reads
        deadline = b.get_timer()
        reads_per_call.append(b.timers.reads - before)
        assert deadline is not None and deadline <= now + config.ack_delay
        if i % 500 == 499:
            before = b.timers.reads
            b.handle_timer(now + config.ack_delay)  # the last 500 acks are due
            b.get_timer()
            assert b.timers.reads - before == 500  # those that ran, no other
    assert len(b.streams) == 5000
    assert max(reads_per_call) == 1  # the receiver just fed, not the other 4999
    before = b.timers.reads
    b.get_timer()
    assert b.timers.reads == before  # nothing changed: nothing read
    # Due timers run without visiting the rest either.
    b.handle_timer(10.0)
    before = b.timers.reads
    b.get_timer()
    b.receive(_direct("A", "s42", 1, body), "A", 10.0)
    b.get_timer()
    assert b.timers.reads - before <= 1


def test_the_total_cap_frees_idle_receivers_first_and_refuses_busy_ones() -> None:
    config = attrs.evolve(SMALL, flow_control=False, max_inbound_streams=50)
    b = Endpoint("B", epoch=1, config=config)
    body = b.codec.split(b"x").pieces[0]
    for i in range(50):  # 50 peers, one busy stream each: seq 1 arrived, seq 0 missing
        b.add_peer(f"P{i}", 0.0)
        b.receive(_direct(f"P{i}", "d", 1, body), f"P{i}", 0.0)
    b.add_peer("Q", 0.0)
    b.receive(_direct("Q", "d", 0, body), "Q", 0.0)
    assert [e.reason for e in _events(b) if isinstance(e, Rejected)] == [TOO_MANY_STREAMS]
    for i in range(50):  # the holes fill: every stream is idle
        b.receive(_direct(f"P{i}", "d", 0, body), f"P{i}", 0.1)
    b.handle_timer(0.2)  # acks go out
    b.receive(_direct("Q", "d", 0, body), "Q", 0.3)
    events = _events(b)
    assert not [e for e in events if isinstance(e, Rejected)]
    assert [e.origin for e in events if isinstance(e, Delivered)][-1] == "Q"
    assert len(b.streams) == 50 and b.stats.receivers_freed == 1
    # The freed stream resumes where it stopped: its next message, nothing twice, no Gap.
    b.receive(_direct("P0", "d", 1, body), "P0", 0.4)  # a late duplicate
    b.receive(_direct("P0", "d", 2, body), "P0", 0.4)
    events = _events(b)
    assert [(e.origin, e.seq) for e in events if isinstance(e, Delivered)] == [("P0", 2)]
    assert not [e for e in events if isinstance(e, Gap | Rejected)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_idle_stream_is_freed_and_resumes_exactly_once_without_a_gap(seed: int) -> None:
    net = SimNetwork(seed=seed, faults=LinkFaults(drop=0.2, duplicate=0.2, reorder=0.2))
    net.add_node("A", config=SMALL)
    b = net.add_node("B", config=SMALL)
    net.subscribe("B", "t")
    first = [b"m%d" % i + bytes(i * 3000) for i in range(10)]
    for m in first:
        net.send("A", "B", "d", m)
        net.publish("A", "t", m)
    assert net.run_until(lambda: len(b.delivered()) == 20, until=10.0)
    idle_at = net.now
    net.run(idle_at + SMALL.idle_stream_timeout + 1.0)
    assert b.endpoint.inbound("A", "d", direct=True) is None  # freed
    assert b.endpoint.inbound("A", "t") is not None  # a subscribed topic's stays
    assert b.endpoint.stats.receivers_freed == 1
    second = [b"n%d" % i for i in range(10)]
    for m in second:
        net.send("A", "B", "d", m)
    assert net.run_until(lambda: len(b.delivered("d")) == 20, until=net.now + 10.0)
    net.run(net.now + 2.0)
    direct = b.delivered("d")
    assert [d.payload for d in direct] == first + second
    assert [d.seq for d in direct] == list(range(20))
    assert b.gaps() == [] and b.rejected() == []
