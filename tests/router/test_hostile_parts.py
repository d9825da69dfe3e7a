"""The parts that keep a node standing against bad input: no network needed."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.health import HEALTH_TOPIC, HealthView, PeerRow
from discovery.metrics import rejection_counts, render_metrics
from discovery.peers import ExchangeBook
from p2p_reliable import schema
from router.dialplan import DialPlanner
from router.penalty import PenaltyBox, PenaltyConfig
from router.rejections import OTHER, RejectionCounter
from router.topics import TopicDecodeError

PEER = "12D3KooWRDhYmw7tW8muSSogHzh6Y7JpEAEUYbQ571DVoW4e6Qvb"
OTHER_PEER = "12D3KooWGzBxq6pJk2Yx3bV5qzfs4s9kbc6HhQ9d3w4m1pLr8vTe"


def _row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "peer": PEER,
        "state": "ALIVE",
        "phi": 0.1,
        "rtt_ewma": 0.001,
        "rtt_p50": 0.001,
        "rtt_p99": None,
        "loss_ratio": 0.0,
        "retransmit_ratio": 0.0,
        "sent": 1,
        "retransmits": 0,
        "received": 2,
        "nacks_sent": 0,
        "nacks_received": 0,
        "losses": 0,
        "checksum_failures": 0,
        "decode_errors": 0,
        "unrecoverable": 0,
        "rejections": {},
        "last_seen": 1.0,
        "score": 1.0,
    }
    row.update(changes)
    return row


def _view(**changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "node_id": PEER,
        "instance": "abc",
        "role": "node",
        "addrs": [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"],
        "sent_at": time.time(),
        "peers": [_row()],
        "duplicates": [],
        "label": "",
    }
    view.update(changes)
    return view


def test_a_good_view_round_trips() -> None:
    data = msgpack.packb(_view())
    view = HEALTH_TOPIC.deserialize(data)
    assert isinstance(view, HealthView) and isinstance(view.peers[0], PeerRow)
    assert HEALTH_TOPIC.deserialize(HEALTH_TOPIC.serialize(view)) == view


BAD_VIEWS = [
    _view(peers=[1]),
    _view(peers=[{"state": "ALIVE"}]),
    _view(peers=[_row(peer=5)]),
    _view(peers=[_row(state="FINE")]),
    _view(peers=[_row(phi="high")]),
    _view(peers=[_row(sent=-1)]),
    _view(peers=[_row(sent=True)]),
    _view(peers=[_row(listen_addrs=5)]),
    _view(peers=[_row(rejections=[1, 2])]),
    _view(peers=[_row(extra=1)]),
    _view(addrs=5),
    _view(addrs=["x" * 300]),
    _view(sent_at="yesterday"),
    _view(sent_at=float("nan")),
    _view(peers=[_row()] * 300),
    _view(node_id=None),
    _view(duplicates="me"),
    {"node_id": PEER},
    [1, 2, 3],
]


@pytest.mark.parametrize("bad", BAD_VIEWS)
def test_a_malformed_view_is_refused_not_raised_later(bad: Any) -> None:
    with pytest.raises(TopicDecodeError):
        HEALTH_TOPIC.deserialize(msgpack.packb(bad))


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_any_shape_is_either_a_valid_view_or_a_topic_decode_error(value: Any) -> None:
    try:
        view = HEALTH_TOPIC.deserialize(msgpack.packb(value))
    except TopicDecodeError:
        return
    assert isinstance(view, HealthView)  # pragma: no cover - random data is never a view


def test_a_view_is_accepted_only_from_the_node_it_names() -> None:
    view = HEALTH_TOPIC.deserialize(msgpack.packb(_view()))
    HEALTH_TOPIC.check_origin(view, PEER)
    with pytest.raises(TopicDecodeError, match="claims to come from"):
        HEALTH_TOPIC.check_origin(view, OTHER_PEER)


def test_schema_decode_bounds_the_document_before_parsing() -> None:
    with pytest.raises(schema.SchemaError, match="exceed"):
        schema.decode(b"\x00" * 100, HealthView, max_bytes=10)
    with pytest.raises(schema.SchemaError, match="not msgpack"):
        schema.decode(b"\xc1", HealthView)


def test_exchange_hands_each_address_once_and_caps_a_view() -> None:
    book = ExchangeBook(per_source=3, capacity=5)
    addrs = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}" for port in range(1, 11)]
    assert book.fresh([*addrs, "junk", "/ip4/127.0.0.1/tcp/9"]) == addrs[:3]
    assert book.capped == 7
    assert book.fresh(addrs[:3]) == []  # never twice
    assert book.fresh(addrs[3:]) == addrs[3:6]
    assert len(book._seen) == 5  # bounded


def test_an_exchanged_address_is_forgotten_after_one_failure() -> None:
    planner = DialPlanner(seed=1, max_addresses=3)
    addr = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"
    assert planner.add(addr, "exchange", 0.0)
    planner.due(0.0, connected=[])
    planner.on_result(addr, ok=False, now=0.0)
    assert addr not in planner.addresses and addr in planner.dropped
    for port in range(2, 10):
        planner.add(f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}", "exchange", 0.0)
    assert len(planner.addresses) == 3 and planner.refused == 5
    assert planner.add(f"/ip4/10.0.0.1/tcp/1/p2p/{OTHER_PEER}", "bootstrap", 0.0)  # configured


def test_a_peer_that_keeps_at_it_is_cut_off_for_a_while() -> None:
    box = PenaltyBox(PenaltyConfig(max_bad=5, window=10.0, ban=60.0))
    # A few refusals now and then never add up.
    assert not any(box.bad("slow", t * 3.0) for t in range(20))
    verdicts = [box.bad("flood", 100.0 + i * 0.01) for i in range(10)]
    assert verdicts.index(True) == 5 and verdicts.count(True) == 1
    assert box.banned("flood", 159.0) and not box.banned("flood", 161.0)


def test_rejections_are_counted_per_peer_in_bounded_memory() -> None:
    counter = RejectionCounter(max_keys=3)
    counter.count("a", "bad hello")
    counter.count("a", "bad hello")
    counter.count("b", "oversized frame")
    counter.count("c", "x")
    counter.count("d", "x")  # beyond the table: counted, but not by its own name
    assert counter[("a", "bad hello")] == 2 and counter[(OTHER, "x")] == 1
    assert counter.of("a") == 2 and len(counter) == 4


def test_every_rejection_kind_is_a_metric_with_its_peer() -> None:
    rows = [_row(rejections={"cluster secret": 3}, decode_errors=2)]
    counts = rejection_counts(rows, {(OTHER_PEER, "bad hello"): 4})
    text = render_metrics("me", rows, counts)
    assert f'p2pr_rejected_total{{kind="cluster secret",node="me",peer="{PEER}"}} 3.0' in text
    assert f'p2pr_rejected_total{{kind="malformed envelope",node="me",peer="{PEER}"}} 2.0' in text
    assert f'p2pr_rejected_total{{kind="bad hello",node="me",peer="{OTHER_PEER}"}} 4.0' in text
