"""RFC 6298 estimation and the backoff-with-jitter schedule."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_reliable.recovery import SPURIOUS_WIDENING, RetryPolicy, RttEstimator


def test_rfc6298_first_and_later_samples() -> None:
    est = RttEstimator(RetryPolicy(base=0.5, min_rto=0.001, cap=10.0))
    assert est.rto == 0.5  # no sample yet: the initial RTO
    est.on_sample(0.100)
    assert est.srtt == pytest.approx(0.100)
    assert est.rttvar == pytest.approx(0.050)
    assert est.rto == pytest.approx(0.100 + 4 * 0.050)
    est.on_sample(0.200)
    # RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R'|, computed before SRTT <- 7/8 SRTT + 1/8 R'.
    assert est.rttvar == pytest.approx(0.75 * 0.050 + 0.25 * 0.100)
    assert est.srtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.200)
    assert est.rto == pytest.approx(est.srtt + 4 * est.rttvar)


def test_rto_is_clamped_to_the_policy() -> None:
    est = RttEstimator(RetryPolicy(base=0.2, min_rto=0.05, cap=1.0))
    est.on_sample(0.0001)
    assert est.rto == 0.05
    for _ in range(5):
        est.on_sample(30.0)
    assert est.rto == 1.0


@given(
    st.floats(0.0, 5.0),
    st.integers(0, 40),
    st.integers(0, 2**32),
)
def test_delay_stays_between_rto_and_backed_off_ceiling(
    rto: float, attempt: int, seed: int
) -> None:
    policy = RetryPolicy(base=0.2, min_rto=0.02, cap=2.0, max_attempts=8)
    delay = policy.delay(rto, attempt, random.Random(seed))
    floor = min(max(rto, policy.min_rto), policy.cap)
    assert floor <= delay <= max(floor, min(policy.cap, floor * 2**attempt))
    assert delay <= policy.cap


def test_delays_back_off_exponentially_on_average_and_are_jittered() -> None:
    policy = RetryPolicy(base=0.2, min_rto=0.01, cap=100.0)
    rng = random.Random(1)
    means = []
    for attempt in range(6):
        samples = [policy.delay(0.01, attempt, rng) for _ in range(2000)]
        means.append(sum(samples) / len(samples))
        if attempt >= 2:
            assert len({round(s, 9) for s in samples}) > 1000  # spread, not lockstep
    # The floor at the RTO flattens the first steps; after that each ceiling doubles.
    assert all(higher > lower for lower, higher in itertools.pairwise(means))
    for lower, higher in itertools.pairwise(means[2:]):
        assert higher > 1.5 * lower
    assert means[5] > 10 * means[0]


def test_the_schedule_is_the_seeds_full_jitter_draws() -> None:
    policy = RetryPolicy()

    def schedule(seed: int) -> list[float]:
        rng = random.Random(seed)  # one generator for the whole schedule, as a sender has
        return [policy.delay(0.05, attempt, rng) for attempt in range(8)]

    one = schedule(7)
    assert schedule(7) == one  # replays exactly
    assert schedule(8) != one  # the jitter comes from the seed
    # Each wait is the next draw of the seed's stream, uniform up to the attempt's ceiling,
    # never below the floor (full jitter).
    draws = random.Random(7)
    floor = min(max(0.05, policy.min_rto), policy.cap)
    for attempt, delay in enumerate(one):
        ceiling = min(policy.cap, floor * 2**attempt)
        assert delay == max(floor, draws.uniform(0.0, ceiling))


def test_inconsistent_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(min_rto=3.0, cap=1.0)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_timeouts_back_off_the_rto_until_a_new_sample() -> None:
    est = RttEstimator(RetryPolicy(base=0.1, min_rto=0.01, cap=10.0))
    est.on_sample(0.05)
    rto = est.rto
    est.on_timeout()
    assert est.rto == pytest.approx(2 * rto)
    est.on_timeout()
    assert est.rto == pytest.approx(4 * rto)
    est.on_sample(0.05)
    fresh = est.rto
    assert fresh < 2 * rto  # RFC 6298 (5.7): a fresh sample ends the backoff
    for _ in range(50):
        est.on_timeout()
    assert est.rto == pytest.approx(min(10.0, 64 * fresh))  # bounded backoff, and the cap
    est.on_sample(0.05)
    after_sample = est.rto
    assert est.srtt is not None
    assert after_sample == pytest.approx(est.srtt + 4 * est.rttvar)  # the backoff was reset
    for _ in range(50):
        est.on_timeout()
    assert est.rto == pytest.approx(min(10.0, 64 * after_sample))  # and grows back to its cap
    est2 = RttEstimator(RetryPolicy(base=0.1, min_rto=0.01, cap=1.0))
    est2.on_sample(0.5)
    est2.on_timeout()
    assert est2.rto == 1.0


def test_the_budget_is_stated_or_the_span_of_max_attempts_at_the_cap() -> None:
    assert RetryPolicy(cap=2.0, max_attempts=8).max_span() == 16.0
    assert RetryPolicy(cap=2.0, max_attempts=8, budget=30.0).max_span() == 30.0
    with pytest.raises(ValueError):
        RetryPolicy(budget=0.0)


def test_reported_ack_delay_is_taken_out_of_samples() -> None:
    est = RttEstimator(RetryPolicy(base=0.3, min_rto=0.01, cap=2.0))
    assert est.on_sample(0.105, ack_delay=0.100) == pytest.approx(0.005)
    assert est.min_rtt == pytest.approx(0.005)
    # A report as long as the sample itself is not believed.
    assert est.on_sample(0.004, ack_delay=0.010) == pytest.approx(0.004)
    # Nor can one make a sample shorter than the clock's granularity.
    assert est.on_sample(0.050, ack_delay=0.0499999) == pytest.approx(0.001)


def test_the_probe_timeout_is_two_srtt_plus_the_ack_delay() -> None:
    policy = RetryPolicy(base=0.3, min_rto=0.2, cap=2.0)
    est = RttEstimator(policy)
    assert est.pto(0.005) == 0.3  # no sample yet: the base
    for rtt in (0.005, 0.035) * 10:
        est.on_sample(rtt)
    # RFC 8985's 2 * SRTT, plus what the receiver may hold its ack; a varying RTT does not
    # widen it (the RTO's SRTT + 4 * RTTVAR does).
    assert est.srtt is not None
    assert est.pto(0.005) == pytest.approx(2 * est.srtt + 0.005)
    assert est.upper_bound() == pytest.approx(est.srtt + 4 * est.rttvar)
    assert est.pto(0.0) < est.upper_bound()
    assert est.pto(0.005) < policy.min_rto  # a probe comes long before an RTO would
    for _ in range(5):
        est.on_sample(30.0)
    assert est.pto(0.005) == policy.cap


@given(st.floats(0.001, 1.0), st.integers(0, 40), st.integers(0, 2**32))
def test_unanswered_probes_back_off_exponentially_up_to_the_cap(
    pto: float, probes: int, seed: int
) -> None:
    policy = RetryPolicy(cap=2.0)
    delay = policy.probe_delay(pto, probes, random.Random(seed))
    ceiling = min(policy.cap, pto * 2**probes)
    if probes == 0:
        assert delay == min(pto, policy.cap)
    else:
        assert ceiling / 2 <= delay <= ceiling


def test_the_reordering_window_is_a_quarter_of_the_minimum_rtt() -> None:
    est = RttEstimator(RetryPolicy())
    assert est.reorder_window() == 0.001  # nothing measured: the clock's granularity
    est.on_sample(0.040)
    est.on_sample(0.020)
    assert est.reorder_window() == pytest.approx(0.005)


def test_a_spurious_probe_widens_the_probe_timeout_for_a_while() -> None:
    rtt = RttEstimator(RetryPolicy())
    for sample in (0.002, 0.002, 0.010, 0.002):  # a busy spell among fast answers
        rtt.on_sample(sample)
    assert rtt.srtt is not None
    narrow = max(2 * rtt.srtt, 0.001)
    assert rtt.pto(0.0) == pytest.approx(narrow)
    assert rtt.srtt + 4 * rtt.rttvar > narrow  # the case where widening matters
    rtt.on_spurious()
    wide = rtt.srtt + 4 * rtt.rttvar
    assert rtt.pto(0.0) == pytest.approx(wide)
    # Wide for the next SPURIOUS_WIDENING samples (busy spells keep the variance up), then
    # narrow again.
    for i in range(SPURIOUS_WIDENING):
        rtt.on_sample(0.010 if i % 2 else 0.002)
        expected = max(2 * rtt.srtt, 0.001)
        if i < SPURIOUS_WIDENING - 1:
            expected = max(expected, rtt.srtt + 4 * rtt.rttvar)
        assert rtt.pto(0.0) == pytest.approx(expected)
    assert rtt.srtt + 4 * rtt.rttvar > 2 * rtt.srtt
