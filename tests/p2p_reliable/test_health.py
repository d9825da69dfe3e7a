"""Tests for p2p_reliable.health. All times are virtual; nothing here sleeps."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_reliable.health import (
    PHI_CAP,
    RATE_BUCKETS,
    HealthConfig,
    HealthSnapshot,
    HealthTable,
    PeerHealth,
    PeerState,
    PhiAccrual,
)

CFG = HealthConfig(min_std=0.01, acceptable_pause=0.0)


def regular(
    det: PhiAccrual | PeerHealth, n: int, interval: float = 0.1, jitter: float = 0.0
) -> float:
    """Feed ``n`` heartbeats ``interval`` apart (seeded jitter); return the last time."""
    rng = random.Random(1234)
    t = 0.0
    for i in range(n):
        if i:
            t += interval + rng.uniform(-jitter, jitter)
        if isinstance(det, PhiAccrual):
            det.heartbeat(t)
        else:
            det.on_heartbeat(t)
    return t


def dead_crossing_elapsed(mean: float, std: float, phi_target: float) -> float:
    """Exact silence after which Akka's logistic phi reaches ``phi_target``.

    phi = log10(1 + e^z), so z* = ln(10^phi - 1); z = y(1.5976 + 0.07056 y^2) is
    strictly increasing, so y* follows by bisection and t* = mean + y* std.
    """
    z_star = math.log(10.0**phi_target - 1.0)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid * (1.5976 + 0.07056 * mid * mid) < z_star:
            lo = mid
        else:
            hi = mid
    return mean + (lo + hi) / 2 * std


# -- phi accrual ---------------------------------------------------------------------


def test_phi_zero_before_any_heartbeat() -> None:
    det = PhiAccrual(CFG)
    assert det.last_arrival is None
    assert det.phi(0.0) == 0.0
    assert det.phi(1e9) == 0.0


def test_first_interval_estimate_until_two_intervals() -> None:
    det = PhiAccrual(HealthConfig(first_interval=0.5))
    assert det.interval_mean() == 0.5
    assert det.interval_std() == 0.125
    det.heartbeat(0.0)
    det.heartbeat(0.1)
    assert det.interval_mean() == 0.5  # one interval says nothing about spread yet
    det.heartbeat(0.4)
    assert det.interval_mean() == pytest.approx(0.2)
    assert det.interval_std() == pytest.approx(0.1)


def test_history_is_bounded_to_phi_window() -> None:
    det = PhiAccrual(HealthConfig(phi_window=3))
    for t in [0.0, 10.0, 20.0, 20.1, 20.2, 20.3]:
        det.heartbeat(t)
    assert det.interval_mean() == pytest.approx(0.1)
    assert det.last_arrival == 20.3


def test_phi_at_mean_is_log10_2() -> None:
    det = PhiAccrual(CFG)
    last = regular(det, 50)
    # y = 0 there, so the logistic CDF is exactly 1/2.
    assert det.phi(last + det.interval_mean()) == pytest.approx(math.log10(2.0))


def test_phi_rises_monotonically_with_silence() -> None:
    det = PhiAccrual(CFG)
    last = regular(det, 100, jitter=0.002)
    values = [det.phi(last + k * 0.005) for k in range(200)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[-1] > values[0]


def test_phi_small_shortly_after_heartbeat() -> None:
    det = PhiAccrual(CFG)
    last = regular(det, 100, jitter=0.002)
    for dt in (0.0, 0.01, 0.05, 0.09, 0.1):
        assert det.phi(last + dt) < 1.0


def test_state_goes_alive_suspect_dead_in_order() -> None:
    peer = PeerHealth("a", CFG)
    last = regular(peer, 100, jitter=0.002)
    seen: list[PeerState] = []
    for k in range(1001):  # 1 ms steps over one second of silence
        s = peer.state(last + k * 0.001)
        if not seen or seen[-1] is not s:
            seen.append(s)
    assert seen == [PeerState.ALIVE, PeerState.SUSPECT, PeerState.DEAD]
    assert peer.state(last + 0.5) is PeerState.DEAD
    assert peer.phi(last + 1.0) > CFG.phi_dead


def test_exact_dead_crossing_time_for_100ms_heartbeats() -> None:
    det = PhiAccrual(CFG)
    last = regular(det, 100)  # perfectly regular: std 0, so min_std 0.01 applies
    assert det.interval_std() == pytest.approx(0.0, abs=1e-12)
    t_star = dead_crossing_elapsed(det.interval_mean(), CFG.min_std, CFG.phi_dead)
    # About 0.152 s: 5.2 floored standard deviations past the 100 ms mean.
    assert 0.1 < t_star < 1.0
    assert t_star == pytest.approx(0.1522, abs=1e-3)
    assert det.phi(last + t_star - 1e-6) < CFG.phi_dead <= det.phi(last + t_star + 1e-6)
    t_suspect = dead_crossing_elapsed(det.interval_mean(), CFG.min_std, CFG.phi_suspect)
    assert 0.1 < t_suspect < t_star
    assert det.phi(last + t_suspect - 1e-6) < CFG.phi_suspect <= det.phi(last + t_suspect + 1e-6)


def test_acceptable_pause_delays_suspicion() -> None:
    plain, paused = PhiAccrual(CFG), PhiAccrual(HealthConfig(acceptable_pause=0.5))
    last = regular(plain, 50)
    regular(paused, 50)
    assert paused.phi(last + 0.5) < 1.0 < plain.phi(last + 0.5)


def test_huge_silence_is_capped_and_finite() -> None:
    det = PhiAccrual(CFG)
    regular(det, 10)
    assert det.phi(1e300) == PHI_CAP
    assert det.phi(math.inf) == PHI_CAP
    assert det.phi(-math.inf) == 0.0
    assert det.phi(math.nan) == PHI_CAP


finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    beats=st.lists(finite, max_size=40),
    queries=st.lists(st.floats(allow_nan=False), min_size=1, max_size=10),
    min_std=st.floats(1e-9, 10.0),
    pause=st.floats(0.0, 1e6),
)
def test_phi_never_nan_negative_or_raising(
    beats: list[float], queries: list[float], min_std: float, pause: float
) -> None:
    det = PhiAccrual(HealthConfig(min_std=min_std, acceptable_pause=pause, phi_window=8))
    for t in beats:  # arbitrary order, including time running backwards
        det.heartbeat(t)
    for q in queries:
        phi = det.phi(q)
        assert not math.isnan(phi)
        assert 0.0 <= phi <= PHI_CAP


@settings(max_examples=200, deadline=None)
@given(
    intervals=st.lists(st.floats(0.0, 100.0), max_size=30),
    start=st.floats(-1e6, 1e6),
    offsets=st.lists(st.floats(-1e3, 1e4), min_size=2, max_size=20),
)
def test_phi_monotone_in_query_time(
    intervals: list[float], start: float, offsets: list[float]
) -> None:
    det = PhiAccrual(CFG)
    t = start
    det.heartbeat(t)
    for dt in intervals:
        t += dt
        det.heartbeat(t)
    last = det.last_arrival
    assert last is not None
    values = [det.phi(last + off) for off in sorted(offsets)]
    assert all(b >= a for a, b in itertools.pairwise(values))


# -- liveness state ------------------------------------------------------------------


def test_unknown_before_heartbeats() -> None:
    peer = PeerHealth("a", CFG)
    peer.on_received(1.0)
    peer.on_rtt_sample(0.01, 1.0)
    assert peer.state(5.0) is PeerState.UNKNOWN
    assert peer.phi(5.0) == 0.0


def test_stream_reset_is_dead_until_next_heartbeat() -> None:
    peer = PeerHealth("a", CFG)
    last = regular(peer, 20)
    assert peer.state(last + 0.01) is PeerState.ALIVE
    peer.on_stream_reset(last + 0.01)
    assert peer.state(last + 0.01) is PeerState.DEAD
    assert peer.score(last + 0.01) == 0.0
    peer.on_heartbeat(last + 0.02)
    assert peer.state(last + 0.03) is PeerState.ALIVE


def test_stream_reset_before_any_heartbeat_is_dead() -> None:
    peer = PeerHealth("a", CFG)
    peer.on_stream_reset(0.0)
    assert peer.state(0.0) is PeerState.DEAD
    peer.on_heartbeat(1.0)
    assert peer.state(1.0) is PeerState.ALIVE


# -- RTT -----------------------------------------------------------------------------


def test_rtt_ewma_matches_rfc6298_by_hand() -> None:
    peer = PeerHealth("a", CFG)
    assert peer.rtt_ewma() is None
    peer.on_rtt_sample(0.1, 0.0)
    assert peer.rtt_ewma() == 0.1  # first sample seeds SRTT
    peer.on_rtt_sample(0.2, 1.0)
    assert peer.rtt_ewma() == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)  # 0.1125
    peer.on_rtt_sample(0.05, 2.0)
    assert peer.rtt_ewma() == pytest.approx(0.1046875)
    for bad in (-1.0, math.nan, math.inf):
        peer.on_rtt_sample(bad, 3.0)
    assert peer.rtt_ewma() == pytest.approx(0.1046875)


def test_rtt_percentiles_nearest_rank() -> None:
    peer = PeerHealth("a", CFG)
    assert peer.rtt_percentile(50) is None
    for rtt in [35.0, 50.0, 15.0, 40.0, 20.0]:  # the textbook nearest-rank example
        peer.on_rtt_sample(rtt, 0.0)
    expected = {0: 15.0, 5: 15.0, 30: 20.0, 40: 20.0, 50: 35.0, 99: 50.0, 100: 50.0}
    for p, v in expected.items():
        assert peer.rtt_percentile(p) == v
    with pytest.raises(ValueError):
        peer.rtt_percentile(101)
    with pytest.raises(ValueError):
        peer.rtt_percentile(-1)


def test_rtt_percentile_window_is_bounded() -> None:
    peer = PeerHealth("a", HealthConfig(rtt_window=3))
    for rtt in [9.0, 8.0, 1.0, 2.0, 3.0]:
        peer.on_rtt_sample(rtt, 0.0)
    assert peer.rtt_percentile(100) == 3.0
    assert peer.rtt_percentile(0) == 1.0


# -- windowed ratios -----------------------------------------------------------------


def test_loss_ratio() -> None:
    peer = PeerHealth("a", CFG)
    assert peer.loss_ratio(0.0) == 0.0
    peer.on_received(1.0, 90)
    peer.on_loss_detected(1.0, 10)
    assert peer.loss_ratio(1.0) == pytest.approx(0.1)


def test_retransmit_ratio() -> None:
    peer = PeerHealth("a", CFG)
    assert peer.retransmit_ratio(0.0) == 0.0
    peer.on_sent(1.0, 100)
    peer.on_retransmit(1.5, 25)
    assert peer.retransmit_ratio(2.0) == pytest.approx(0.25)
    lonely = PeerHealth("b", CFG)
    lonely.on_retransmit(0.0, 3)
    assert lonely.retransmit_ratio(0.0) == 3.0


def test_ratios_are_windowed() -> None:
    cfg = HealthConfig(rate_window=10.0)
    bucket = cfg.rate_window / RATE_BUCKETS
    peer = PeerHealth("a", cfg)
    peer.on_loss_detected(0.0, 50)
    peer.on_received(0.0, 50)
    peer.on_sent(0.0, 10)
    peer.on_retransmit(0.0, 10)
    assert peer.loss_ratio(0.9 * cfg.rate_window) == pytest.approx(0.5)
    assert peer.retransmit_ratio(0.9 * cfg.rate_window) == pytest.approx(1.0)
    later = cfg.rate_window + bucket
    assert peer.loss_ratio(later) == 0.0
    assert peer.retransmit_ratio(later) == 0.0
    peer.on_received(later, 3)
    peer.on_loss_detected(later, 1)
    assert peer.loss_ratio(later) == pytest.approx(0.25)
    # Totals are lifetime counts, unaffected by the window.
    assert peer.losses == 51 and peer.received == 53


def test_rate_memory_is_bounded() -> None:
    peer = PeerHealth("a", HealthConfig(rate_window=1.0))
    for k in range(10_000):
        peer.on_sent(k * 0.01)
    assert len(peer._w_sent._buckets) <= RATE_BUCKETS
    assert peer.sent == 10_000


def test_negative_counts_rejected() -> None:
    peer = PeerHealth("a", CFG)
    with pytest.raises(ValueError):
        peer.on_loss_detected(0.0, -1)


# -- score ---------------------------------------------------------------------------


def healthy_peer(cfg: HealthConfig = CFG) -> tuple[PeerHealth, float]:
    peer = PeerHealth("a", cfg)
    last = regular(peer, 50)
    peer.on_sent(last, 100)
    peer.on_received(last, 100)
    peer.on_rtt_sample(0.01, last)
    return peer, last


def test_score_perfect_peer_is_one_and_dead_is_zero() -> None:
    peer, last = healthy_peer()
    assert peer.score(last + 0.01) == 1.0
    assert peer.state(last + 2.0) is PeerState.DEAD
    assert peer.score(last + 2.0) == 0.0


def test_score_strictly_lower_with_corruption() -> None:
    clean, last = healthy_peer()
    dirty, _ = healthy_peer()
    dirty.on_checksum_failure(last)
    assert dirty.score(last) < clean.score(last)
    worse, _ = healthy_peer()
    worse.on_checksum_failure(last)
    worse.on_decode_error(last)
    assert worse.score(last) < dirty.score(last)


def test_score_rtt_penalty_is_mild() -> None:
    fast, last = healthy_peer()
    slow, _ = healthy_peer()
    slow.on_rtt_sample(0.2, last)
    slow.on_rtt_sample(0.2, last)
    assert slow.score(last) == pytest.approx(0.5 * fast.score(last))
    ok, _ = healthy_peer()
    ok.on_rtt_sample(0.04, last)
    assert ok.score(last) == fast.score(last)


event_kinds = st.sampled_from(
    ["sent", "retx", "recv", "loss", "checksum", "decode", "unrec", "rtt", "hb", "reset"]
)
events = st.lists(st.tuples(event_kinds, st.integers(0, 50), st.floats(0.0, 30.0)), max_size=40)


def apply(peer: PeerHealth, evs: list[tuple[str, int, float]]) -> None:
    for kind, n, t in evs:
        if kind == "sent":
            peer.on_sent(t, n)
        elif kind == "retx":
            peer.on_retransmit(t, n)
        elif kind == "recv":
            peer.on_received(t, n)
        elif kind == "loss":
            peer.on_loss_detected(t, n)
        elif kind == "checksum":
            peer.on_checksum_failure(t)
        elif kind == "decode":
            peer.on_decode_error(t)
        elif kind == "unrec":
            peer.on_unrecoverable(t, n)
        elif kind == "rtt":
            peer.on_rtt_sample(n / 100.0, t)
        elif kind == "hb":
            peer.on_heartbeat(t)
        elif kind == "reset":
            peer.on_stream_reset(t)
        else:
            raise AssertionError(kind)


@settings(max_examples=200, deadline=None)
@given(evs=events, now=st.floats(0.0, 40.0))
def test_score_in_unit_interval(evs: list[tuple[str, int, float]], now: float) -> None:
    peer = PeerHealth("a", CFG)
    apply(peer, evs)
    s = peer.score(now)
    assert 0.0 <= s <= 1.0
    if peer.state(now) is PeerState.DEAD:
        assert s == 0.0


@settings(max_examples=200, deadline=None)
@given(
    evs=events,
    delay=st.floats(0.0, 15.0),
    base=st.integers(0, 100),
    extra=st.integers(0, 100),
    at=st.floats(0.0, 40.0),
    kind=st.sampled_from(["loss", "checksum", "decode", "unrec"]),
)
def test_score_monotone_in_bad_events(
    evs: list[tuple[str, int, float]], delay: float, base: int, extra: int, at: float, kind: str
) -> None:
    # Queried no earlier than the latest event, as a driver with a monotonic clock does.
    now = max([at, *(t for _, _, t in evs)]) + delay

    def build(k: int) -> PeerHealth:
        peer = PeerHealth("a", CFG)
        apply(peer, evs)
        if kind in ("loss", "unrec"):
            apply(peer, [(kind, k, at)])
        else:
            apply(peer, [(kind, 0, at)] * k)
        return peer

    assert build(base + extra).score(now) <= build(base).score(now)


# -- snapshots and table -------------------------------------------------------------


def test_snapshot_fields_and_json() -> None:
    peer, last = healthy_peer()
    peer.on_retransmit(last, 2)
    peer.on_nack_sent(last, 3)
    peer.on_nack_received(last, 4)
    peer.on_loss_detected(last, 5)
    peer.on_checksum_failure(last)
    peer.on_decode_error(last)
    peer.on_unrecoverable(last)
    peer.on_rejected(last, "auth")
    peer.on_rejected(last, "auth")
    peer.on_rejected(last, "replay")
    snap = peer.snapshot(last + 0.01)
    assert snap.state is PeerState.ALIVE
    assert (snap.sent, snap.retransmits, snap.received) == (100, 2, 100)
    assert (snap.nacks_sent, snap.nacks_received, snap.losses) == (3, 4, 5)
    assert (snap.checksum_failures, snap.decode_errors, snap.unrecoverable) == (1, 1, 1)
    assert snap.rejections == (("auth", 2), ("replay", 1))
    assert snap.last_seen == last
    assert snap.rtt_p50 == snap.rtt_p99 == 0.01
    assert 0.0 < snap.score < 1.0
    hash(snap)
    d = snap.to_dict()
    assert d["state"] == "ALIVE"
    assert d["rejections"] == {"auth": 2, "replay": 1}
    assert json.loads(json.dumps(d)) == d


def test_snapshot_json_with_missing_values() -> None:
    snap = PeerHealth("fresh", CFG).snapshot(0.0)
    d = snap.to_dict()
    assert d["rtt_ewma"] is None and d["rtt_p99"] is None and d["last_seen"] is None
    assert d["state"] == "UNKNOWN"
    json.dumps(d)


def test_last_seen_tracks_heartbeats_and_envelopes() -> None:
    peer = PeerHealth("a", CFG)
    peer.on_heartbeat(1.0)
    peer.on_received(3.0)
    peer.on_heartbeat(2.0)
    assert peer.last_seen == 3.0


def test_health_table() -> None:
    cfg = HealthConfig(phi_dead=9.0)
    table = HealthTable(cfg)
    b = table.get("b")
    assert table.get("b") is b
    assert b.config is cfg
    table.get("a").on_heartbeat(0.0)
    assert table.peers() == ["a", "b"]
    assert "a" in table and len(table) == 2
    snaps = table.snapshots(0.0)
    assert [s.peer for s in snaps] == ["a", "b"]
    assert all(isinstance(s, HealthSnapshot) for s in snaps)
    table.remove("a")
    table.remove("missing")
    assert table.peers() == ["b"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"phi_suspect": 9.0, "phi_dead": 8.0},
        {"phi_window": 0},
        {"min_std": 0.0},
        {"acceptable_pause": -1.0},
        {"rtt_alpha": 0.0},
        {"rate_window": 0.0},
    ],
)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthConfig(**kwargs)  # type: ignore[arg-type]
