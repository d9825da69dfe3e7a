"""The benchmarks' rounds: configurations interleaved, each figure a median with its spread."""

from __future__ import annotations

import pytest

from p2pr.bench.repeats import median_and_spread, run_interleaved, summarize, with_spread


def test_every_round_runs_every_configuration_in_the_same_order() -> None:
    calls: list[tuple[str, int]] = []
    said: list[str] = []

    def measure(config: str, round_index: int) -> str:
        calls.append((config, round_index))
        return f"{config}{round_index}"

    samples = run_interleaved(["a", "b", "c"], 2, measure, said.append)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]
    assert samples == [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]
    assert said[0] == "a (round 1 of 2)" and said[-1] == "c (round 2 of 2)"
    with pytest.raises(ValueError):
        run_interleaved(["a"], 0, measure)


def test_median_and_spread_skip_missing_values() -> None:
    assert median_and_spread([3.0, 1.0, 2.0, None]) == (2.0, [1.0, 3.0])
    assert median_and_spread([4, 2]) == (3, [2, 4])  # counts stay whole when they can
    assert median_and_spread([1, 2]) == (1.5, [1, 2])
    assert median_and_spread([None, None]) == (None, None)


def test_summarize_takes_medians_of_the_figures_and_the_rest_from_the_first_round() -> None:
    rounds = [
        {"case": "x", "p99_ms": 10.0, "rate": 5.0},
        {"case": "x", "p99_ms": 30.0, "rate": 7.0},
        {"case": "x", "p99_ms": 20.0, "rate": 6.0},
    ]
    row = summarize(rounds, ["p99_ms", "rate"])
    assert row == {
        "case": "x",
        "p99_ms": 20.0,
        "p99_ms_spread": [10.0, 30.0],
        "rate": 6.0,
        "rate_spread": [5.0, 7.0],
    }
    assert with_spread(row, "p99_ms", "{:.1f}") == "20.0 (10.0–30.0)"
    assert with_spread({"a": 2.0, "a_spread": [2.0, 2.0]}, "a") == "2"  # one value: no range
    assert with_spread({"a": None, "a_spread": None}, "a") == ""
