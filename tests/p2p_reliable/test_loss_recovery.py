"""Loss recovery at the speed of the link, in virtual time: tail probes, RACK, redundant
copies, RTT samples free of receiver-side delay, the give-up budget, the delay window."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_reliable import Endpoint, KiB, MiB, ProtocolConfig, RetryPolicy, Unrecoverable
from p2p_reliable.envelope import Kind, decode, decode_batch
from p2p_reliable.testing import LinkFaults, SimNetwork

STREAM = "tok"
# Heartbeats (whose marks let a receiver NACK a tail hole) far apart: what repairs a loss
# below is the publisher's own detection.
QUIET = ProtocolConfig(heartbeat_interval=10.0)


def _pair(config: ProtocolConfig, delay: float = 0.01, seed: int = 1) -> SimNetwork:
    net = SimNetwork(seed=seed, faults=LinkFaults(delay=delay, jitter=0.0))
    net.add_node("A", config=config)
    net.add_node("B", config=config)
    return net


def _drop_data(net: SimNetwork, seq: int, times: int) -> list[float]:
    """Drop the first `times` transmissions of DATA `seq` from A; return when each was sent."""
    sent: list[float] = []

    def drop(src: str, dst: str, data: bytes) -> bool:
        for raw in decode_batch(data):
            env = decode(raw)
            if src == "A" and env.kind == Kind.DATA and env.seq == seq:
                sent.append(net.now)
                return len(sent) <= times
        return False

    net.drop_filter = drop
    return sent


def _send_one_at_a_time(net: SimNetwork, count: int) -> None:
    b = net.nodes["B"]
    for i in range(count):
        net.send("A", "B", STREAM, f"warm {i}".encode())
        assert net.run_until(lambda i=i: len(b.delivered()) == i + 1, until=net.now + 1.0)
        net.run(net.now + 0.02)  # its ack arrives too


def test_a_lost_tail_is_probed_after_about_two_srtt() -> None:
    net = _pair(QUIET)
    a, b = net.nodes["A"], net.nodes["B"]
    _send_one_at_a_time(net, 20)
    rtt = a.endpoint.rtt("B")
    # Network RTT 20 ms; the receiver's 5 ms ack timer is reported and taken out.
    assert rtt.srtt == pytest.approx(0.020, abs=1e-4)
    # A lone message after a pause: B acks it at once, so the probe waits 2 * SRTT only.
    pto = rtt.pto(0.0)
    assert pto == pytest.approx(2 * 0.020, abs=1e-3)
    sent = _drop_data(net, seq=20, times=1)
    net.send("A", "B", STREAM, b"the token")
    start = net.now
    assert net.run_until(lambda: len(b.delivered()) == 21, until=start + 1.0)
    when, msg = b.delivered_at()[-1]
    assert msg.payload == b"the token"
    # Sent, lost, probed once a probe timeout later (no later message could reveal the
    # loss), and delivered one way after that: not after the 200 ms minimum RTO, nor after
    # a NACK (there was no hole for B to see).
    assert sent == [start, pytest.approx(start + pto)]
    assert when == pytest.approx(start + pto + 0.01)
    stats = a.endpoint.stats
    assert (stats.probes, stats.retransmits, stats.nack_retransmits) == (1, 1, 0)
    assert b.endpoint.stats.nacks_sent == 0


def test_an_acknowledgement_of_later_data_repairs_a_hole_at_once() -> None:
    net = _pair(QUIET)
    a, b = net.nodes["A"], net.nodes["B"]
    _send_one_at_a_time(net, 10)
    sent = _drop_data(net, seq=10, times=1)
    net.send("A", "B", STREAM, b"lost")
    net.run(net.now + 0.002)
    net.send("A", "B", STREAM, b"after")
    start = sent[0]
    assert net.run_until(lambda: len(b.delivered()) == 12, until=start + 1.0)
    # B acks the out-of-order "after" at once; that ack shows "lost" missing though sent
    # before it (RACK): it is sent again as soon as it is an RTT plus a reordering window
    # (a quarter of the minimum RTT) old, long before any probe or NACK.
    assert sent[1] == pytest.approx(start + 0.020 + 0.020 / 4)
    assert [m.payload for m in b.delivered()[-2:]] == [b"lost", b"after"]
    assert a.endpoint.stats.rack_retransmits == 1
    assert a.endpoint.stats.probes == 0


def _manual_pair(config: ProtocolConfig) -> tuple[Endpoint, Endpoint]:
    a = Endpoint("A", epoch=1, config=config, seed=1)
    b = Endpoint("B", epoch=1, config=config, seed=2)
    for one, other in ((a, "B"), (b, "A")):
        one.add_peer(other, 0.0)
        one.handle_timer(0.0)  # the first heartbeat, out of the way
        one.datagrams_to_send(0.0)
    return a, b


def _deliver(src: Endpoint, dst: Endpoint, now: float, arrived: float | None = None) -> None:
    for tx in src.datagrams_to_send(now):
        dst.receive(tx.data, src.node_id, now, arrived=arrived)


@pytest.mark.parametrize("stamped", [True, False])
def test_rtt_samples_exclude_the_time_a_frame_waited_in_the_receiver(stamped: bool) -> None:
    a, b = _manual_pair(QUIET)
    a.send("B", STREAM, b"x", 0.0)
    # The frame reaches B's host after 1 ms, but B's loop takes it in 100 ms later (and
    # acks at once: the first message of a stream).
    _deliver(a, b, 0.101, arrived=0.001 if stamped else None)
    assert b.get_timer() == 0.101
    b.handle_timer(0.101)
    _deliver(b, a, 0.102)
    latest = a.rtt("B").latest
    # Stamped, the wait is part of the reported ack delay: the sample is the network's 2 ms.
    # Unstamped, it is indistinguishable from the network and counts.
    assert latest == pytest.approx(0.002 if stamped else 0.102)


def _warm_up(a: Endpoint, b: Endpoint) -> None:
    """One message from A to B and its ack: A's RTT estimate for B is 2 ms."""
    a.send("B", STREAM, b"warm", 0.0)
    _deliver(a, b, 0.001)
    b.handle_timer(b.get_timer() or 0.001)
    _deliver(b, a, 0.002)
    assert a.rtt("B").latest == pytest.approx(0.002)


def _probe_a_busy_receiver(a: Endpoint, b: Endpoint) -> None:
    """A (with a 2 ms SRTT to B) sends one message; B's process is busy for 30 ms, so A
    probes; B then takes in the original and the probe, in that order."""
    _warm_up(a, b)
    a.send("B", STREAM, b"token", 0.1)
    original = [tx.data for tx in a.datagrams_to_send(0.1)]
    probe_at = a.get_timer()
    assert probe_at is not None and probe_at < 0.13
    a.handle_timer(probe_at)
    probe = [tx.data for tx in a.datagrams_to_send(probe_at)]
    assert a.stats.probes == 1
    for data in original + probe:
        b.receive(data, "A", 0.13)


def test_the_original_of_a_spurious_probe_still_gives_an_rtt_sample() -> None:
    a, b = _manual_pair(QUIET)
    _probe_a_busy_receiver(a, b)
    b.handle_timer(b.get_timer() or 0.13)
    _deliver(b, a, 0.131)
    # B says it got the original first: the 31 ms it took is a sample (B's busy spell is
    # the path's, for all A can tell), and the probe is counted as spurious. Without the
    # sample, a busy receiver's slow answers would never be measured, its fast ones only,
    # and the probe timer would stay too short for it.
    assert a.rtt("B").latest == pytest.approx(0.031)
    assert a.stats.spurious_retransmits == 1
    assert b.stats.duplicates == 1  # the probe


def test_a_receiver_that_was_away_for_several_probes_gives_no_sample() -> None:
    a, b = _manual_pair(QUIET)
    _warm_up(a, b)
    a.send("B", STREAM, b"token", 0.1)
    sent = [tx.data for tx in a.datagrams_to_send(0.1)]
    for _ in range(2):  # B is stopped (SIGSTOP): neither probe is answered
        probe_at = a.get_timer()
        assert probe_at is not None and probe_at < 3.0
        a.handle_timer(probe_at)
        sent += [tx.data for tx in a.datagrams_to_send(probe_at)]
    assert a.stats.probes == 2
    for data in sent:  # B runs again after 3 s and reads the original first
        b.receive(data, "A", 3.0)
    b.handle_timer(b.get_timer() or 3.0)
    _deliver(b, a, 3.001)
    # The 2.9 s pause is no round trip: the estimate keeps the warm-up's sample.
    assert a.unacked() == 0
    assert a.rtt("B").latest == pytest.approx(0.002)
    assert a.stats.spurious_retransmits == 2


def test_a_repair_that_arrived_first_gives_no_sample() -> None:
    a, b = _manual_pair(QUIET)
    _warm_up(a, b)
    a.send("B", STREAM, b"token", 0.1)
    a.datagrams_to_send(0.1)  # the original is lost
    probe_at = a.get_timer()
    assert probe_at is not None
    a.handle_timer(probe_at)
    _deliver(a, b, probe_at + 0.001)  # the probe arrives, flagged as sent again
    b.handle_timer(b.get_timer() or probe_at + 0.001)
    _deliver(b, a, probe_at + 0.002)
    # Acknowledged, but not a measurement of the original (Karn): the sample is still the
    # warm-up's, and nothing was spurious.
    assert a.unacked() == 0
    assert a.rtt("B").latest == pytest.approx(0.002)
    assert a.stats.spurious_retransmits == 0


def test_the_ack_delay_is_that_of_the_largest_sequence_number() -> None:
    a, b = _manual_pair(QUIET)
    a.send("B", STREAM, b"first", 0.0)
    _deliver(a, b, 0.001)  # B's ack timer starts: due at 0.006
    a.send("B", STREAM, b"second", 0.003)
    _deliver(a, b, 0.004)
    b.handle_timer(0.006)
    _deliver(b, a, 0.007)
    # The sample comes from "second" (sent at 3 ms, acked at 7 ms, held 2 ms by B): 2 ms.
    # Measured from "first"'s arrival the delay would be 5 ms, and the path look faster.
    assert a.rtt("B").latest == pytest.approx(0.002)


def test_a_live_peer_is_not_given_up_after_a_count_of_attempts() -> None:
    # The old policy gave a message up after max_attempts = 8 transmissions; now only the
    # budget (5 s here) or the peer's removal ends the tries.
    retry = RetryPolicy(base=0.05, min_rto=0.02, cap=0.2, max_attempts=8, budget=5.0)
    config = attrs.evolve(QUIET, retry=retry, heartbeat_interval=0.1)
    net = _pair(config, delay=0.001)
    a, b = net.nodes["A"], net.nodes["B"]
    sent = _drop_data(net, seq=2, times=15)
    for i in range(6):
        net.send("A", "B", STREAM, f"m{i}".encode())
    assert net.run_until(lambda: len(b.delivered()) == 6, until=retry.max_span())
    assert [m.payload for m in b.delivered()] == [f"m{i}".encode() for i in range(6)]
    assert len(sent) == 16 and not a.unrecoverable() and not b.gaps()


def test_the_budget_ends_in_unrecoverable_exactly_when_it_runs_out() -> None:
    retry = RetryPolicy(base=0.05, min_rto=0.02, cap=0.2, budget=3.0)
    config = attrs.evolve(QUIET, retry=retry, heartbeat_interval=0.1)
    net = _pair(config, delay=0.001)
    a, b = net.nodes["A"], net.nodes["B"]
    _send_one_at_a_time(net, 1)
    sent = _drop_data(net, seq=1, times=10**6)
    net.send("A", "B", STREAM, b"lost")
    net.send("A", "B", STREAM, b"after")
    assert net.run_until(lambda: bool(b.gaps()), until=10.0)
    ((when, verdict),) = [
        (t, e) for t, e in zip(a.event_times, a.events, strict=True) if isinstance(e, Unrecoverable)
    ]
    assert (verdict.seq, verdict.reason) == (1, "retry budget exhausted")
    assert when == pytest.approx(sent[0] + retry.max_span())
    assert len(sent) > 10  # tried all along
    ((gap_at, gap),) = [
        (t, e) for t, e in zip(b.event_times, b.events, strict=True) if e in b.gaps()
    ]
    assert (gap.start, gap.stop, gap.reason) == (1, 2, "publisher could not repair")
    # B heard it from A, before its own timeout (which is longer than the budget).
    assert gap_at < sent[0] + config.effective_gap_timeout
    assert [m.payload for m in b.delivered()] == [b"warm 0", b"after"]


def test_a_removed_peer_is_given_up_at_once() -> None:
    net = _pair(QUIET, delay=0.001)
    a = net.nodes["A"]
    net.partition("A", "B", 0.0, None)
    net.send("A", "B", STREAM, b"never")
    net.run(0.5)
    assert not a.unrecoverable()  # still within the budget: probes go on
    a.endpoint.remove_peer("B", net.now)
    net.run(net.now)
    assert [(u.seq, u.reason) for u in a.unrecoverable()] == [(0, "peer removed")]


def test_a_removed_subscriber_is_told_of_no_gap_and_repairs_from_retention() -> None:
    net = _pair(QUIET, delay=0.001)
    a, b = net.nodes["A"], net.nodes["B"]
    net.subscribe("B", "topic")
    sent = _drop_data(net, seq=1, times=1000)
    for i in range(3):  # one frame each
        net.publish("A", "topic", b"m%d" % i)
        net.run(net.now + 0.002)
    assert net.run_until(lambda: len(sent) >= 2, until=1.0)  # m1 lost, sent again, lost
    assert [m.payload for m in b.delivered()] == [b"m0"]
    # The publisher stops waiting for B (its subscription seemed to go), while B, still
    # subscribed, keeps its receive state.
    a.endpoint.remove_subscriber("topic", "B", net.now)
    net.drop_filter = None
    net.run(net.now + 0.01)
    assert [(u.seq, u.reason) for u in a.unrecoverable()] == [(1, "unsubscribed")]
    a.endpoint.add_subscriber("topic", "B", net.now)
    assert net.run_until(lambda: len(b.delivered()) == 3, until=net.now + 5.0)
    # No GAP reached B for what it lacked then: it got m1 from A's retention.
    assert [m.payload for m in b.delivered()] == [b"m0", b"m1", b"m2"]
    assert b.gaps() == []


def _redundant(**changes: object) -> ProtocolConfig:
    return attrs.evolve(QUIET, redundant_streams={STREAM, "topic"}, **changes)  # type: ignore[arg-type]


def test_a_lost_redundant_message_costs_only_the_spacing() -> None:
    config = _redundant()
    net = _pair(config, delay=0.001)
    a, b = net.nodes["A"], net.nodes["B"]
    _send_one_at_a_time(net, 5)
    sent = _drop_data(net, seq=5, times=1)
    net.send("A", "B", STREAM, b"the token")
    assert net.run_until(lambda: len(b.delivered()) == 6, until=net.now + 1.0)
    when, _ = b.delivered_at()[-1]
    assert when == pytest.approx(sent[0] + config.redundant_spacing + 0.001)
    assert a.endpoint.stats.probes == a.endpoint.stats.retransmits == 0


def test_no_copy_once_acknowledged() -> None:
    # A spacing longer than the RTT: every message is acknowledged before its copy is due.
    config = _redundant(redundant_spacing=0.1)
    net = _pair(config, delay=0.001)
    _send_one_at_a_time(net, 10)
    assert net.nodes["A"].endpoint.stats.redundant_copies == 0


def test_redundant_messages_are_delivered_exactly_once_in_order_through_faults() -> None:
    config = _redundant(heartbeat_interval=0.1, window_messages=16)
    faults = LinkFaults(drop=0.2, duplicate=0.1, reorder=0.2, corrupt=0.02)
    net = SimNetwork(seed=7, faults=faults)
    for name in "ABC":
        net.add_node(name, config=config)
    net.subscribe("B", "topic")
    net.subscribe("C", "topic")
    msgs = [f"token {i}".encode() for i in range(300)]
    for m in msgs:
        net.send("A", "B", STREAM, m)
        net.publish("A", "topic", m)
    b, c = net.nodes["B"], net.nodes["C"]

    def done() -> bool:
        return len(b.delivered()) == 2 * len(msgs) and len(c.delivered()) == len(msgs)

    assert net.run_until(done, until=120.0)
    net.run(net.now + 2.0)  # late copies and duplicates change nothing
    assert [m.payload for m in b.delivered(STREAM)] == msgs
    assert [m.payload for m in b.delivered("topic")] == msgs
    assert [m.payload for m in c.delivered("topic")] == msgs
    assert net.nodes["A"].endpoint.stats.redundant_copies > 0
    assert b.endpoint.stats.duplicates > 0 and c.endpoint.stats.duplicates > 0
    assert not (b.gaps() or c.gaps() or net.nodes["A"].unrecoverable())


def _bulk_latencies(target: float | None, drop: float = 0.0) -> tuple[list[float], float, int]:
    """16 KiB messages over a 4 MB/s link with a 64 MiB window (`drop` of the frames lost
    both ways): each one's latency, the time the last took, the publisher's retransmissions."""
    config = ProtocolConfig(
        window_bytes=64 * MiB,
        window_messages=4096,
        queue_delay_target=target,
        compress_threshold=1 * MiB,
        # Frames of a few messages: the link serialises one in 16 ms.
        max_frame_bytes=64 * KiB,
        max_fragment_payload=32 * KiB,
        max_message_size=1 * MiB,
    )
    net = SimNetwork(seed=3, faults=LinkFaults(delay=0.001, jitter=0.0))
    net.add_node("A", config=config)
    net.add_node("B", config=config)
    net.set_link("A", "B", LinkFaults(delay=0.001, jitter=0.0, bandwidth=4e6, drop=drop))
    net.set_link("B", "A", LinkFaults(delay=0.001, jitter=0.0, drop=drop))
    count = 800
    for _ in range(count):
        net.send("A", "B", "bulk", bytes(16 * KiB))
    b = net.nodes["B"]
    assert net.run_until(lambda: len(b.delivered()) == count, until=60.0)
    published = {seq: t for t, _, _, seq in net.nodes["A"].published}
    latencies = [t - published[m.seq] for t, m in b.delivered_at()]
    return latencies, net.now, net.nodes["A"].endpoint.stats.retransmits


def test_the_delay_window_keeps_the_queue_short_at_full_speed() -> None:
    latencies, elapsed, retransmits = _bulk_latencies(target=0.05)
    unlimited, elapsed_unlimited, _ = _bulk_latencies(target=None)
    line_rate = 800 * 16 * KiB / 4e6  # 3.3 s
    # Without the delay window the whole burst queues in front of the link: the last
    # message waits the whole transfer. With it the wait settles near the target.
    assert max(unlimited) > 0.8 * line_rate
    settled = latencies[len(latencies) // 4 :]
    assert max(settled) < 3 * 0.05
    # The link stays busy all the same, and nothing is sent twice.
    assert elapsed < 1.05 * elapsed_unlimited
    assert retransmits == 0


def test_the_delay_window_keeps_a_lossy_link_busy_and_its_queue_short() -> None:
    latencies, elapsed, retransmits = _bulk_latencies(target=0.05, drop=0.1)
    _, elapsed_unlimited, unlimited_retransmits = _bulk_latencies(target=None, drop=0.1)
    # Lost bytes count as in flight until repaired, and the queue stays near the target:
    # repairs wait behind little, so most messages wait for no repair. (A cut sized on the
    # bytes in flight at the ack rather than at the sample's sending took 18% longer here,
    # with a median latency of 430 ms.)
    assert sorted(latencies)[len(latencies) // 2] < 2 * 0.05
    assert elapsed < 1.05 * elapsed_unlimited
    assert retransmits <= unlimited_retransmits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    drop=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.2),
    reorder=st.floats(0.0, 0.3),
    bandwidth=st.sampled_from([None, 2e5, 2e6]),
    spacing=st.sampled_from([0.0, 0.002, 0.05]),
    count=st.integers(1, 30),
)
def test_exactly_once_in_order_with_copies_probes_and_a_narrow_link(
    seed: int,
    drop: float,
    duplicate: float,
    reorder: float,
    bandwidth: float | None,
    spacing: float,
    count: int,
) -> None:
    config = ProtocolConfig(
        max_fragment_payload=256,
        max_frame_bytes=1 * KiB,
        max_message_size=64 * KiB,
        compress_threshold=512,
        window_messages=16,
        min_window_bytes=2 * KiB,
        redundant_streams={STREAM, "topic"},
        redundant_max_bytes=600,  # some messages go twice, some (fragmented ones too) not
        redundant_spacing=spacing,
        retry=RetryPolicy(base=0.05, min_rto=0.02, cap=1.0, budget=60.0),
    )
    faults = LinkFaults(drop=drop, duplicate=duplicate, reorder=reorder, bandwidth=bandwidth)
    net = SimNetwork(seed=seed, faults=faults)
    for name in "ABC":
        net.add_node(name, config=config)
    net.subscribe("B", "topic")
    net.subscribe("C", "topic")
    msgs = [bytes([i % 256]) * (i * 97 % 1500) for i in range(count)]
    for m in msgs:
        net.send("A", "B", STREAM, m)
        net.publish("A", "topic", m)
    b, c = net.nodes["B"], net.nodes["C"]

    def done() -> bool:
        return len(b.delivered()) == 2 * count and len(c.delivered()) == count

    assert net.run_until(done, until=50.0), f"stuck at t={net.now}"
    net.run(net.now + 2.0)
    assert [m.payload for m in b.delivered(STREAM)] == msgs
    assert [m.payload for m in b.delivered("topic")] == msgs
    assert [m.payload for m in c.delivered("topic")] == msgs
    assert not (b.gaps() or c.gaps() or net.nodes["A"].unrecoverable())


def test_rack_learns_how_late_a_reordering_path_delivers() -> None:
    # A link that holds 30% of frames back by up to 20 ms, and loses nothing: every message
    # RACK sends again is a spurious one. It learns the lateness from the first few
    # (acknowledged too soon to be its retransmissions) and then waits it out.
    faults = LinkFaults(delay=0.005, jitter=0.0, reorder=0.3, reorder_delay=0.02)
    net = SimNetwork(seed=1, faults=faults)
    net.add_node("A", config=QUIET)
    net.add_node("B", config=QUIET)
    count = 1000
    for i in range(count):
        net.at(i * 0.002, lambda i=i: net.send("A", "B", STREAM, f"m{i}".encode()))
    b = net.nodes["B"]
    assert net.run_until(lambda: len(b.delivered()) == count, until=30.0)
    assert [m.payload for m in b.delivered()] == [f"m{i}".encode() for i in range(count)]
    # About 300 messages were held back; learning costs a few spurious retransmissions, a
    # fixed window of a quarter of the minimum RTT costs about 250 here.
    assert net.nodes["A"].endpoint.stats.rack_retransmits < count * faults.reorder / 30
