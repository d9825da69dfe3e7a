"""The pure parts of taking stage nodes back: the client's roster of peers, and what it takes
from the stage nodes' health views (which come from the network)."""

from __future__ import annotations

from typing import Any

from discovery.health import HealthView
from inference_glue.roster import Roster
from inference_glue.stage_exchange import exchanged_addrs
from p2p_reliable import schema


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
    return schema.structure({**base, **fields}, HealthView)


def row(peer: str, observer: bool, addrs: list[str]) -> dict[str, Any]:
    return {
        "peer": peer, "state": "ALIVE", "phi": 0.0, "rtt_ewma": None, "rtt_p50": None,
        "rtt_p99": None, "loss_ratio": 0.0, "retransmit_ratio": 0.0, "sent": 0,
        "retransmits": 0, "received": 0, "nacks_sent": 0, "nacks_received": 0, "losses": 0,
        "checksum_failures": 0, "decode_errors": 0, "unrecoverable": 0, "rejections": {},
        "last_seen": None, "score": 1.0, "observer": observer, "listen_addrs": addrs,
    }  # fmt: skip


def test_stage_views_name_where_stage_nodes_listen() -> None:
    peers = [
        row("s2", False, ["/ip4/127.0.0.1/tcp/2/p2p/s2"]),
        row("cli", True, ["/ip4/127.0.0.1/tcp/3/p2p/cli"]),
        row("s3", False, ["/ip4/127.0.0.1/tcp/4/p2p/s3"]),
    ]
    got = exchanged_addrs(view(peers=peers), skip={"s3"})
    assert got == ["/ip4/127.0.0.1/tcp/1/p2p/s1", "/ip4/127.0.0.1/tcp/2/p2p/s2"]
    assert exchanged_addrs(view(peers=peers), skip={"s1", "s2", "s3"}) == []
