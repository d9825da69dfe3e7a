"""Memory-weighted layer placement."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference_glue.placement import (
    NodeMemory,
    StagePlacement,
    memory_weighted_counts,
    place_layers,
)

GB = 1 << 30


def test_gay_jl_example_18gb_and_8gb() -> None:
    # Exact shares of 32 layers: 32 * 18/26 = 22.15 and 32 * 8/26 = 9.85. Floors 22 + 9 = 31;
    # the last layer goes to the larger remainder (0.85, the 8 GB node): 22 / 10, that is
    # 68.75% / 31.25%, the 69% / 31% of the memory split.
    nodes = [NodeMemory("big", 18 * GB), NodeMemory("small", 8 * GB)]
    assert place_layers(32, nodes) == [
        StagePlacement("big", range(0, 22)),
        StagePlacement("small", range(22, 32)),
    ]
    # SmolLM2's 30 layers: 20.77 / 9.23 -> 20 + 9, the spare layer to the 0.77 remainder.
    assert memory_weighted_counts(30, [18, 8]) == [21, 9]


def test_equal_memory_splits_evenly_and_ties_go_to_earlier_nodes() -> None:
    assert memory_weighted_counts(6, [1, 1, 1]) == [2, 2, 2]
    assert memory_weighted_counts(7, [1, 1, 1]) == [3, 2, 2]
    assert memory_weighted_counts(8, [1, 1, 1]) == [3, 3, 2]


def test_every_node_gets_a_layer_when_there_are_enough() -> None:
    # 100:1 would round the small node to 0 of 4 layers.
    assert memory_weighted_counts(4, [100, 1]) == [3, 1]
    assert memory_weighted_counts(3, [100, 1, 1]) == [1, 1, 1]


def test_fewer_layers_than_nodes_leaves_nodes_out() -> None:
    nodes = [NodeMemory("a", 1), NodeMemory("b", 5), NodeMemory("c", 2)]
    assert place_layers(1, nodes) == [StagePlacement("b", range(0, 1))]


@given(
    num_layers=st.integers(min_value=0, max_value=200),
    memory=st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=8),
)
def test_counts_sum_and_stay_within_one_layer_of_the_share(
    num_layers: int, memory: list[int]
) -> None:
    counts = memory_weighted_counts(num_layers, memory)
    assert sum(counts) == num_layers
    if num_layers >= len(memory):
        assert min(counts) >= 1
    shares = [Fraction(num_layers * m, sum(memory)) for m in memory]
    if all(s >= 1 for s in shares):
        # No minimum-one adjustment: plain largest remainder, within one of each share.
        assert all(abs(c - s) < 1 for c, s in zip(counts, shares))


def test_explicit_ranges_override_the_memory_weighting() -> None:
    nodes = [NodeMemory("a", 18), NodeMemory("b", 8)]
    assert place_layers(32, nodes, explicit=[range(0, 4), range(4, 32)]) == [
        StagePlacement("a", range(0, 4)),
        StagePlacement("b", range(4, 32)),
    ]
    with pytest.raises(ValueError, match="contiguous"):
        place_layers(32, nodes, explicit=[range(0, 4), range(5, 32)])
    with pytest.raises(ValueError, match="cover 30 of 32"):
        place_layers(32, nodes, explicit=[range(0, 4), range(4, 30)])
    with pytest.raises(ValueError, match="1 explicit ranges for 2 nodes"):
        place_layers(32, nodes, explicit=[range(0, 32)])


def test_bad_memory_is_rejected() -> None:
    with pytest.raises(ValueError):
        NodeMemory("a", 0)
    with pytest.raises(ValueError):
        memory_weighted_counts(4, [])
    with pytest.raises(ValueError):
        memory_weighted_counts(4, [1, -2])
