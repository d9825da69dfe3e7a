"""Placement: which contiguous range of layers each node of the pipeline runs.

Layers are split in proportion to the nodes' free memory, as in exo's memory-weighted ring
partitioning: with 18 GB and 8 GB free, the first node gets 18/26 = 69% of the layers and
the second 31%. Shares are rounded with the largest-remainder method, so the counts always
sum to the number of layers and each is within one layer of its exact share; then every
node gets at least one layer when there are enough layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import attrs

__all__ = [
    "NodeMemory",
    "StagePlacement",
    "contiguous_ranges",
    "memory_weighted_counts",
    "place_layers",
]


@attrs.frozen
class NodeMemory:
    """A node of the ring and the memory it offers, in any unit (bytes, GB)."""

    node_id: str
    free_memory: float

    def __attrs_post_init__(self) -> None:
        if not self.free_memory > 0:
            raise ValueError(f"node {self.node_id!r}: free memory must be > 0")


@attrs.frozen
class StagePlacement:
    """One pipeline stage: a node and the layers `layers.start` to `layers.stop - 1`."""

    node_id: str
    layers: range


def memory_weighted_counts(num_layers: int, memory: Sequence[float]) -> list[int]:
    """Layer counts proportional to `memory`, rounded by largest remainder.

    Each node first gets the floor of its exact share `num_layers * m_i / sum(m)`; the layers
    left over go one each to the nodes with the largest fractional parts, earlier nodes first
    on ties. Then, if `num_layers >= len(memory)`, a node left with 0 layers takes one from
    the node with the most layers, so every node gets at least one. Computed with exact
    fractions, so the result does not depend on float rounding.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not memory:
        raise ValueError("no nodes to place layers on")
    if any(not m > 0 for m in memory):
        raise ValueError(f"free memory must be > 0 on every node, got {list(memory)}")
    weights = [Fraction(m) for m in memory]
    total = sum(weights)
    shares = [num_layers * w / total for w in weights]
    counts = [int(s) for s in shares]
    leftover = num_layers - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    if num_layers >= len(counts):
        for i in range(len(counts)):
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] = 1
    return counts


def contiguous_ranges(counts: Sequence[int]) -> list[range]:
    """[2, 3, 1] -> [range(0, 2), range(2, 5), range(5, 6)]."""
    ranges = []
    start = 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def place_layers(
    num_layers: int,
    nodes: Sequence[NodeMemory],
    explicit: Sequence[range] | None = None,
) -> list[StagePlacement]:
    """Assign contiguous layer ranges to `nodes`, in ring order (node 0 runs the first layers).

    Args:
        num_layers: the model's number of transformer layers.
        nodes: the nodes in pipeline order, with their free memory.
        explicit: overrides the memory weighting: one range per node, contiguous, in order,
            covering `range(num_layers)` exactly (an empty range leaves a node out).

    Nodes that get no layers (fewer layers than nodes) are left out of the result.
    """
    if explicit is not None:
        if len(explicit) != len(nodes):
            raise ValueError(f"{len(explicit)} explicit ranges for {len(nodes)} nodes")
        ranges = list(explicit)
        expected_start = 0
        for node, layers in zip(nodes, ranges):
            if layers.step != 1 or layers.start != expected_start or layers.stop < layers.start:
                raise ValueError(
                    f"explicit ranges must be contiguous and in order: node {node.node_id!r} "
                    f"has {layers}, expected one starting at {expected_start}"
                )
            expected_start = layers.stop
        if expected_start != num_layers:
            raise ValueError(f"explicit ranges cover {expected_start} of {num_layers} layers")
    else:
        counts = memory_weighted_counts(num_layers, [n.free_memory for n in nodes])
        ranges = contiguous_ranges(counts)
    return [StagePlacement(node.node_id, layers) for node, layers in zip(nodes, ranges) if layers]
