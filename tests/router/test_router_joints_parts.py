"""The parts that decide what happens when peers join, hang or return: no network needed."""

from __future__ import annotations

import logging

import msgpack
import pytest

from p2p_reliable.twins import TwinDetector
from router.dialplan import DialPlanner
from router.liveness import HangDetector, LivenessConfig
from router.membership import Hello, HelloError, Membership, MembershipChange, Role
from router.ratelog import RateLimitedLog

PEER = "12D3KooWRDhYmw7tW8muSSogHzh6Y7JpEAEUYbQ571DVoW4e6Qvb"
BARE = "/ip4/127.0.0.1/tcp/4002"


def _hello(
    role: Role = Role.MEMBER, topics: tuple[str, ...] = ("a",), epoch: int = 1, seq: int = 0
) -> Hello:
    return Hello(role=role, topics=frozenset(topics), epoch=epoch, seq=seq)


def test_a_member_is_announced_once_connected_and_heard() -> None:
    m = Membership()
    assert m.on_connected("p") == MembershipChange("p")  # nothing known yet: no announcement
    change = m.on_hello("p", _hello(topics=("a", "b")))
    assert change.announce is True and change.subscribed == {"a", "b"}
    assert m.subscribers("a") == {"p"} and m.announced() == {"p"}
    # The same hello again (a second connection) changes nothing.
    assert m.on_hello("p", _hello(topics=("a", "b"))) == MembershipChange("p")
    change = m.on_hello("p", _hello(topics=("b",), seq=1))
    assert change.unsubscribed == {"a"} and change.announce is None
    # An older hello arriving late is ignored.
    assert m.on_hello("p", _hello(topics=("a", "b"), seq=0)) == MembershipChange("p")
    change = m.on_disconnected("p")
    assert change.announce is False and change.unsubscribed == {"b"}
    assert m.announced() == set() and m.subscribers("b") == set()


def test_a_hello_before_the_connection_event_still_announces() -> None:
    m = Membership()
    change = m.on_hello("p", _hello())
    assert change.announce is None and not change.subscribed
    change = m.on_connected("p")
    assert change.announce is True and change.subscribed == {"a"}


def test_an_observer_is_never_announced() -> None:
    m = Membership()
    m.on_connected("o")
    change = m.on_hello("o", _hello(role=Role.OBSERVER, topics=("p2pr/health",)))
    assert change.announce is None and m.is_observer("o")
    assert m.subscribers("p2pr/health") == {"o"}  # it still hears what it subscribed to
    assert m.on_disconnected("o").announce is None


def test_hello_wire_format_is_strict() -> None:
    hello = _hello(topics=("x", "y"), epoch=7, seq=3)
    assert Hello.decode(hello.encode()) == hello
    good = msgpack.unpackb(hello.encode())
    bad_bodies = [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({**good, "extra": 1}),
        msgpack.packb({**good, "v": 2}),
        msgpack.packb({**good, "role": "king"}),
        msgpack.packb({**good, "topics": "x"}),
        msgpack.packb({**good, "topics": [1]}),
        msgpack.packb({**good, "topics": [""]}),
        msgpack.packb({**good, "topics": ["t"] * 257}),
        msgpack.packb({**good, "epoch": -1}),
        msgpack.packb({**good, "seq": "3"}),
        b"\x00" * 70000,
    ]
    for body in bad_bodies:
        with pytest.raises(HelloError):
            Hello.decode(body)


def test_a_silent_dead_peer_is_probed_once() -> None:
    cfg = LivenessConfig(silence=1.5, check_interval=0.25, stall=1.0)
    hangs = HangDetector(cfg)
    assert hangs.check(10.0, {"p": 9.9, "q": 8.9}, dead={"q"}) == []  # not silent long enough
    assert hangs.check(10.25, {"p": 10.2, "q": 8.9}, dead={"q"}) == []
    assert hangs.check(10.5, {"p": 10.4, "q": 8.9}, dead={"q"}) == ["q"]
    assert hangs.check(10.75, {"p": 10.7, "q": 8.9}, dead={"q"}) == []  # probe in flight
    hangs.probe_done("q")
    assert hangs.check(11.0, {"p": 10.9, "q": 8.9}, dead={"q"}) == ["q"]
    # Silent but not dead by phi (e.g. a peer with irregular heartbeats): no probe.
    assert hangs.check(11.0, {"p": 1.0}, dead=set()) == []


def test_after_our_own_stall_nobody_is_judged_on_old_silence() -> None:
    hangs = HangDetector(LivenessConfig(silence=1.5, check_interval=0.25, stall=1.0))
    assert hangs.check(10.0, {"p": 9.9}, dead=set()) == []
    # We were stopped for 5 s: every peer looks silent, and phi says dead.
    assert hangs.check(15.0, {"p": 9.9}, dead={"p"}) == []
    assert hangs.stalls == 1
    assert hangs.check(16.0, {"p": 9.9}, dead={"p"}) == []
    # Fresh silence after the stall does count.
    assert hangs.check(16.25, {"p": 9.9}, dead={"p"}) == []
    assert hangs.check(16.5, {"p": 9.9}, dead={"p"}) == ["p"]


def test_twins_need_interleaving_not_just_two_runs() -> None:
    twins = TwinDetector(window=10.0, slack=0.5)
    for t in (0.0, 0.1, 0.2):
        twins.heard("restart", 1, t)
    for t in (0.9, 1.0):
        twins.heard("restart", 2, t)
    for t in (0.0, 0.1, 5.0, 5.1):  # paused between 0.1 and 5.0
        twins.heard("pause", 1, t)
    for t in (0.0, 0.3, 0.6, 0.9, 1.2):
        twins.heard("clone", 1, t)
        twins.heard("clone", 2, t + 0.1)
    assert twins.twins(5.1) == ["clone"]
    assert twins.twins(30.0) == []  # evidence expires
    for t in range(10):
        twins.heard("many", t, float(t))
    assert twins.runs("many") == 4  # bounded


def test_rate_limited_log_holds_back_floods(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.ratelog")
    limited = RateLimitedLog(logger, interval=60.0, max_keys=2)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        sent = [limited.warning("p", "bad frame", "bad frame from %s", "p") for _ in range(1000)]
        limited.warning("q", "bad frame", "bad frame from %s", "q")
    assert sent.count(True) == 1 and len(caplog.records) == 2
    for i in range(100):
        limited.warning(f"peer{i}", "k", "x")
    assert len(limited._keys) == 2


def test_planner_dials_bare_addresses_and_learns_who_answers() -> None:
    planner = DialPlanner(seed=3, self_id="me")
    assert planner.add(BARE, "bootstrap", 0.0)
    (state,) = planner.due(0.0, connected=[PEER])  # unknown peer: cannot be skipped
    assert state.peer is None and state.bare
    planner.learned(BARE, PEER)
    planner.on_result(BARE, ok=True, now=1.0)
    assert planner.due(5.0, connected=[PEER]) == []  # now known, and connected
    # A failure forgets who answered: a restarted node there may have another key.
    planner.due(5.0, connected=[])
    planner.on_result(BARE, ok=False, now=5.0)
    assert planner.addresses[BARE].peer is None
    # A bare address that turns out to be ourselves is dropped.
    planner.add("/ip4/127.0.0.1/tcp/9", "bootstrap", 0.0)
    planner.learned("/ip4/127.0.0.1/tcp/9", "me")
    assert "/ip4/127.0.0.1/tcp/9" not in planner.addresses
