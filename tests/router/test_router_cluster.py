"""The reliable router across real py-libp2p hosts in separate OS processes on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest

from p2pr.bench.nodes import LocalCluster

pytestmark = pytest.mark.multinode

FAULTS = "drop=0.1,duplicate=0.05,reorder=0.2,corrupt=0.01,seed={seed}"


def _check_exact(result: dict[str, Any], publishers: list[int], count: int) -> None:
    per = result["per_publisher"]
    assert "-1" not in per, f"corrupted payloads reached the application: {per['-1']}"
    for p in publishers:
        tally = per[str(p)]
        assert tally["received"] == count, (p, tally)
        assert tally["duplicates"] == 0 and tally["out_of_order"] == 0 and tally["corrupted"] == 0
    assert result["received"] == len(publishers) * count
    # The protocol's own count agrees with what the application saw.
    assert result["protocol"]["delivered"] == result["received"]
    assert result["bad_payloads"] == {}


# Three nodes: 0 and 1 publish, each hears the other; 2 only listens, to both.
EXPECTATIONS = {0: [1], 1: [0], 2: [0, 1]}


def _three_nodes_through_faults(count: int, extra: list[list[str]]) -> list[dict[str, Any]]:
    """Run the three nodes of EXPECTATIONS with `count` messages per publisher, each node
    with its own fault seed and its `extra` flags; their results."""
    with LocalCluster() as cluster:
        for index, expect in EXPECTATIONS.items():
            cluster.start(
                [
                    f"--index={index}",
                    f"--publish={count if index < 2 else 0}",
                    "--peers=2",
                    f"--expect={len(expect)}",
                    f"--expect-count={count}",
                    f"--faults={FAULTS.format(seed=index + 1)}",
                    *extra[index],
                ]
            )
        return cluster.results(timeout=240)


def test_three_nodes_two_publishers_through_faults() -> None:
    count = 5000  # per publisher: 10,000 messages in all
    results = _three_nodes_through_faults(count, [[], [], []])
    for result in results:
        _check_exact(result, EXPECTATIONS[result["index"]], count)
        shim, proto = result["shim"], result["protocol"]
        # Every frame the shim damaged was rejected by the protocol.
        assert proto["corrupted"] + proto["malformed"] >= shim["corrupted"]
        assert proto["gaps"] == 0 and proto["unrecoverable"] == 0
    # The faults really happened, and left their traces in the protocol's counters. Summed
    # over the nodes: a publisher receives few frames (acks coalesce, more so under load),
    # so one node's shim may damage none of them.
    shims = [r["shim"] for r in results]
    assert all(sum(s[kind] for s in shims) > 0 for kind in ("dropped", "duplicated", "corrupted"))
    assert sum(r["protocol"]["duplicates"] for r in results) > 0
    receiver = next(r for r in results if r["index"] == 2)  # of both streams: most frames
    assert receiver["shim"]["corrupted"] > 0
    for result in results[:2]:
        assert result["protocol"]["messages_sent"] == count
        assert result["protocol"]["retransmits"] > 0


def test_a_64_mib_message_is_delivered() -> None:
    with LocalCluster() as cluster:
        cluster.start(["--index=0", "--publish=1", f"--size={64 << 20}", "--peers=1"])
        cluster.start(["--index=1", "--peers=1", "--expect=1", "--expect-count=1"])
        _, receiver = cluster.results(timeout=240)
    _check_exact(receiver, [0], 1)
    assert receiver["protocol"]["delivered_bytes"] == 64 << 20


def test_a_slow_consumer_slows_the_publisher_and_loses_nothing() -> None:
    count = 400
    window = ["--receive-window=32"]  # credit far below the message count
    with LocalCluster() as cluster:
        publisher = cluster.start(
            ["--index=0", f"--publish={count}", "--size=2048", "--peers=1", *window]
        )
        cluster.start(
            [
                "--index=1",
                "--peers=1",
                "--expect=1",
                f"--expect-count={count}",
                "--consume-delay=0.005",
                "--buffer=4",
                "--record-consumption",
                *window,
            ]
        )
        results = cluster.results(timeout=240)
        assert publisher.result is not None
    receiver = results[1]
    _check_exact(receiver, [0], count)
    # Flow control held the publisher back: the protocol refused its sends until the consumer
    # granted credit, so its last message could only go out (and be acknowledged) once the
    # consumer had taken all but a window's worth: the credit (32), the receiver's channel
    # (4) and what is between the two (a few). Without it the publisher would have been done
    # long before the consumer, which takes 5 ms per message, got that far.
    assert len(receiver["consumed_at"]) == count
    assert results[0]["drained_at"] >= receiver["consumed_at"][count - 64]
    assert results[0]["protocol"]["window_full"] > 0
    assert results[0]["protocol"]["unrecoverable"] == 0


def test_engines_on_the_applications_loops_through_faults() -> None:
    """`RouterConfig.engine_loop="shared"` in every node: point-to-point and topic messages
    through loss, duplication, reordering and corruption, exactly once and in order."""
    count = 1500
    # Node 0 sends point to point to 1 and 2; node 1 publishes on the topic (to 0 and 2).
    shared = "--engine-loop=shared"
    modes = ["--mode=direct", "--mode=topic", "--mode=topic"]
    results = _three_nodes_through_faults(count, [[mode, shared] for mode in modes])
    for result in results:
        assert result["engine_thread"] is False
        _check_exact(result, EXPECTATIONS[result["index"]], count)
        assert result["protocol"]["gaps"] == 0 and result["protocol"]["unrecoverable"] == 0
    assert sum(r["shim"]["dropped"] for r in results) > 0
