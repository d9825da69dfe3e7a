"""The pure parts of taking stage nodes back: the client's roster of peers, and what it takes
from the stage nodes' health views (which come from the network)."""

from __future__ import annotations

from typing import Any

import attrs

from discovery.health import HealthView
from inference_glue.roster import Roster
from inference_glue.stage_exchange import MAX_ADDR_LEN, exchanged_addrs, plausible


def test_a_lost_node_is_back_when_it_answers_or_its_connection_cycles() -> None:
    roster = Roster("me")
    for node in ("a", "b", "c"):
        roster.served(node, 100)
    roster.rank(["a", "b", "c"])
    connected = {"a", "b", "c"}
    # Lost while still connected (it did not answer a probe): not usable, asked again.
    roster.lose("b", connected=True)
    assert roster.usable(connected) == ["a", "c"]
    assert roster.to_ask(connected) == ["b"]
    roster.served("b", 100)  # it answered
    assert roster.usable(connected) == ["a", "b", "c"]
    # Lost by its connection closing: no entry; usable again once connected.
    roster.lose("b", connected=False)
    assert roster.usable({"a", "c"}) == ["a", "c"]
    assert roster.usable(connected) == ["a", "b", "c"] and roster.to_ask(connected) == []
    # Lost while connected, then its connection cycles: judged afresh (asked again).
    roster.lose("c", connected=True)
    roster.disconnected("c")
    assert roster.usable(connected) == ["a", "b", "c"]


def test_quarantined_and_refusing_nodes_stay_out_and_strangers_are_asked_once() -> None:
    roster = Roster("me")
    connected = {"me", "a", "b", "q", "client2", "other-model"}
    assert roster.to_ask(connected) == ["a", "b", "client2", "other-model", "q"]
    for node in ("a", "b", "q"):
        roster.served(node, 10)
    roster.quarantined.add("q")
    roster.refused.add("b")
    roster.no_answer("client2")
    roster.stranger("other-model")
    assert roster.usable(connected) == ["a"]
    assert roster.to_ask(connected) == []
    roster.disconnected("q")
    roster.disconnected("b")
    assert roster.usable(connected) == ["a"]  # deliberate: not even after a reconnect
    # A silent peer is asked again when a health view says it is a stage node; a stranger
    # (it answered with another model) is not, until it reconnects.
    assert not roster.claims_stage("other-model")
    assert roster.claims_stage("client2") and roster.to_ask(connected) == ["client2"]
    roster.disconnected("other-model")
    assert "other-model" in roster.to_ask(connected)


def test_nodes_keep_their_places_and_new_ones_come_last() -> None:
    roster = Roster("me")
    for node in ("z", "y", "x", "new2", "new1"):
        roster.served(node, 1)
    roster.rank(["z", "y", "x"])
    connected = {"z", "y", "x", "new1", "new2"}
    assert roster.usable(connected) == ["z", "y", "x", "new1", "new2"]
    roster.rank(["z", "x"])  # a plan without y does not move y's place
    assert roster.usable(connected) == ["z", "y", "x", "new1", "new2"]


def view(**fields: Any) -> HealthView:
    base: dict[str, Any] = {
        "node_id": "s1",
        "instance": "i",
        "role": "stage",
        "addrs": ["/ip4/127.0.0.1/tcp/1/p2p/s1"],
        "sent_at": 1.0,
        "peers": [],
    }
    return HealthView(**{**base, **fields})


def test_stage_views_name_where_stage_nodes_listen() -> None:
    peers = [
        {"peer": "s2", "observer": False, "listen_addrs": ["/ip4/127.0.0.1/tcp/2/p2p/s2"]},
        {"peer": "cli", "observer": True, "listen_addrs": ["/ip4/127.0.0.1/tcp/3/p2p/cli"]},
        {"peer": "s3", "observer": False, "listen_addrs": ["/ip4/127.0.0.1/tcp/4/p2p/s3"]},
        {"peer": "s4", "observer": False, "listen_addrs": "not a list"},
        {"peer": "s5", "observer": False, "listen_addrs": ["/ip4/1/" + "x" * MAX_ADDR_LEN, 7]},
    ]
    got = exchanged_addrs(view(peers=peers), skip={"s3"})
    assert got == ["/ip4/127.0.0.1/tcp/1/p2p/s1", "/ip4/127.0.0.1/tcp/2/p2p/s2"]
    assert exchanged_addrs(view(peers=peers), skip={"s1", "s2", "s3"}) == []


def test_malformed_views_are_refused() -> None:
    assert plausible(view())
    for bad in (
        {"node_id": ["s1"]},
        {"instance": None},
        {"sent_at": "now"},
        {"addrs": "/ip4/127.0.0.1/tcp/1"},
        {"addrs": [1]},
        {"peers": {"peer": "x"}},
        {"peers": [{"observer": False}]},
        {"peers": ["s2"]},
        {"duplicates": "s1"},
        {"duplicates": [1]},
    ):
        assert not plausible(attrs.evolve(view(), **bad)), bad
