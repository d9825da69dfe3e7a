"""The delay-based window towards a peer (congestion.py), fed samples directly."""

from __future__ import annotations

import pytest

from p2p_reliable.congestion import INITIAL, DelayWindow

KIB = 1024
FLOOR, CEILING = 256 * KIB, 64 * 1024 * KIB


def _window(target: float | None = 0.05) -> DelayWindow:
    return DelayWindow(target, FLOOR, CEILING)


def test_anything_fits_while_nothing_is_in_flight() -> None:
    window = _window()
    assert window.admits(10 * CEILING)
    window.on_sent(window.window)
    assert not window.admits(1)
    window.on_settled(window.window)
    assert window.admits(10 * CEILING)


def test_it_starts_small_and_doubles_per_round_trip_while_the_queue_is_short() -> None:
    window = _window()
    assert window.window == INITIAL * FLOOR
    window.on_sample(0.010, now=0.0)
    start = window.window
    window.on_sent(start)
    window.on_acked(start, in_flight_before=start, now=0.01)  # a round trip's worth
    assert window.window == 2 * start


def test_a_long_queue_cuts_it_to_what_keeps_the_delay_at_the_target_once_per_rtt() -> None:
    window = _window()
    window.window = 4 * 1024 * KIB  # grown since
    window.on_sample(0.010, now=0.0)  # the base delay
    for i in range(4):
        window.on_sample(0.110, now=1.0 + i / 1000)  # 100 ms of queue
    assert window.queueing_delay() == pytest.approx(0.100)
    window.on_acked(64 * KIB, in_flight_before=4 * 1024 * KIB, now=1.0)
    expected = int(4 * 1024 * KIB * (0.010 + 0.05) / 0.110)
    assert window.window == expected
    assert not window.starting
    window.on_acked(64 * KIB, in_flight_before=expected, now=1.05)  # within the same RTT
    assert window.window == expected
    window.on_acked(64 * KIB, in_flight_before=expected, now=1.2)
    assert window.window == max(FLOOR, int(expected * 0.06 / 0.110))


def test_the_cut_keeps_the_rate_the_sample_measured_not_the_bytes_in_flight_now() -> None:
    window = _window()
    window.window = 8 * 1024 * KIB  # doubled since the samples' messages left
    window.on_sample(0.010, now=0.0, pipe=64 * KIB)
    for i in range(4):
        # Sent with 1 MiB ahead of them (some of it further ahead: the shortest counts).
        window.on_sample(0.110 + i / 1000, now=1.0 + i / 1000, pipe=1024 * KIB + i * KIB)
    window.on_acked(64 * KIB, in_flight_before=8 * 1024 * KIB, now=1.0)
    # 1 MiB drained in 110 ms: at that rate, 60 ms hold the base delay plus the target.
    assert window.window == int(1024 * KIB * (0.010 + 0.05) / 0.110)


def test_it_never_goes_below_the_floor_nor_above_the_ceiling() -> None:
    window = _window()
    window.on_sample(0.001, now=0.0)
    for _ in range(4):
        window.on_sample(10.0, now=1.0)
    window.on_acked(KIB, in_flight_before=KIB, now=1.0)
    assert window.window == FLOOR
    fresh = _window()
    fresh.on_sample(0.001, now=0.0)
    for _ in range(100):
        fresh.on_acked(CEILING, in_flight_before=CEILING, now=0.0)
    assert fresh.window == CEILING


def test_an_application_that_sends_little_does_not_grow_it() -> None:
    window = _window()
    window.on_sample(0.010, now=0.0)
    start = window.window
    for _ in range(100):
        window.on_acked(KIB, in_flight_before=KIB, now=0.0)
    assert window.window == start


def test_the_base_delay_forgets_minima_older_than_a_minute() -> None:
    window = _window()
    window.on_sample(0.001, now=0.0)
    window.on_sample(0.020, now=30.0)
    assert window.base_delay() == 0.001
    window.on_sample(0.020, now=75.0)
    assert window.base_delay() == 0.020


def test_without_a_target_it_is_the_send_window() -> None:
    window = _window(target=None)
    assert window.window == CEILING
    window.on_sample(0.001, now=0.0)
    for _ in range(4):
        window.on_sample(1.0, now=1.0)
    window.on_acked(KIB, in_flight_before=CEILING, now=1.0)
    assert window.window == CEILING
