"""The simulated-network demo: three nodes exchanging messages through loss and corruption."""

from __future__ import annotations

import random

import attrs

from p2p_reliable.config import KiB, ProtocolConfig
from p2p_reliable.testing.simnet import LinkFaults, SimNetwork

TOPIC = "demo"


@attrs.frozen
class NodeReport:
    """One row of the demo table."""

    node: str
    sent: int
    delivered: int
    duplicates_suppressed: int
    corrupted_rejected: int
    retransmits: int
    nacks: int
    in_order: bool


@attrs.frozen
class DemoResult:
    """Outcome of a demo run."""

    rows: list[NodeReport]
    virtual_seconds: float
    frames: int
    frames_dropped: int
    frames_corrupted: int
    complete: bool


def run_demo(
    *,
    nodes: int = 3,
    messages: int = 200,
    loss: float = 0.2,
    corrupt: float = 0.02,
    seed: int = 7,
) -> DemoResult:
    """Every node publishes `messages` messages (some fragmented) that all others must get."""
    rng = random.Random(seed)
    # Small frames and fragments so that faults hit individual messages, as they would on
    # a real network where every message travels alone.
    config = ProtocolConfig(
        max_fragment_payload=1 * KiB, max_frame_bytes=2 * KiB, max_message_size=1024 * KiB
    )
    faults = LinkFaults(drop=loss, corrupt=corrupt, duplicate=0.05, reorder=0.1)
    net = SimNetwork(seed=seed, faults=faults)
    names = [f"node-{chr(ord('a') + i)}" for i in range(nodes)]
    for name in names:
        net.add_node(name, config=config)
    for name in names:
        net.subscribe(name, TOPIC)
    sent: dict[str, list[bytes]] = {name: [] for name in names}
    for i in range(messages):
        for name in names:
            size = rng.choice([16, 200, 900, 5000]) if i % 50 else 40_000
            body = f"{name} #{i} ".encode() + rng.randbytes(size)
            sent[name].append(body)
            net.publish(name, TOPIC, body)

    def done() -> bool:
        want = messages * (nodes - 1)
        return all(len(net.nodes[n].delivered(TOPIC)) == want for n in names)

    complete = net.run_until(done, until=600.0)
    rows = [_report(net, name, names, sent) for name in names]
    return DemoResult(
        rows=rows,
        virtual_seconds=round(net.now, 3),
        frames=net.stats.frames,
        frames_dropped=net.stats.dropped,
        frames_corrupted=net.stats.corrupted,
        complete=complete and all(r.in_order for r in rows),
    )


def _report(
    net: SimNetwork, name: str, names: list[str], sent: dict[str, list[bytes]]
) -> NodeReport:
    """What node `name` sent and delivered, and whether it got every other node's messages
    in their order."""
    node = net.nodes[name]
    got: dict[str, list[bytes]] = {}
    for d in node.delivered(TOPIC):
        got.setdefault(d.origin, []).append(d.payload)
    stats = node.endpoint.stats
    return NodeReport(
        node=name,
        sent=stats.messages_sent,
        delivered=stats.delivered,
        duplicates_suppressed=stats.duplicates,
        corrupted_rejected=stats.corrupted + stats.malformed,
        retransmits=stats.retransmits,
        nacks=stats.nacks_sent,
        in_order=all(got.get(o, []) == sent[o] for o in names if o != name),
    )
