"""RangeSet against a plain set of integers."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from p2p_reliable.rangeset import RangeSet

OPS = st.lists(
    st.tuples(st.sampled_from(["add", "subtract"]), st.integers(0, 60), st.integers(0, 12)),
    max_size=40,
)


def _members(rs: RangeSet) -> set[int]:
    return {i for r in rs for i in r}


@given(OPS)
def test_matches_a_set_model(ops: list[tuple[str, int, int]]) -> None:
    rs = RangeSet()
    model: set[int] = set()
    for op, start, length in ops:
        if op == "add":
            rs.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            rs.subtract(start, start + length)
            model -= set(range(start, start + length))
        assert _members(rs) == model
        assert rs.count() == len(model)
        ranges = list(rs)
        # Sorted, disjoint and never adjacent: one entry per maximal run.
        assert all(a.stop < b.start for a, b in itertools.pairwise(ranges))
        assert all(len(r) > 0 for r in ranges)
        for probe in range(0, 75):
            assert (probe in rs) == (probe in model)


@given(OPS, st.integers(0, 70), st.integers(0, 30))
def test_missing_is_the_complement_within_bounds(
    ops: list[tuple[str, int, int]], start: int, length: int
) -> None:
    rs = RangeSet()
    for _, s, n in ops:
        rs.add(s, s + n)
    missing = rs.missing(start, start + length)
    assert _members(missing) == set(range(start, start + length)) - _members(rs)


def test_single_values_and_helpers() -> None:
    rs = RangeSet()
    rs.add(5)
    rs.add(6)
    rs.add(9)
    assert list(rs) == [range(5, 7), range(9, 10)]
    assert rs.bounds() == range(5, 10)
    assert rs.shift() == range(5, 7)
    assert rs == RangeSet([range(9, 10)])
    assert "x" not in rs
