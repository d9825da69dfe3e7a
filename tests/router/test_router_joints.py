"""Joins, hangs and returns between real router processes (tests/router/joint_node.py).

- A peer that publishes the moment it hears of a connection loses nothing (join semantics).
- A hung peer (SIGSTOP) is cut and reported as disconnected; once it resumes it is back.
- An address without /p2p/<id> is enough to join; a malformed one does not stop a node.
- An observer (`p2pr health`) is never announced to the application.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pr.launch import Launched

pytestmark = pytest.mark.multinode

NODE = str(Path(__file__).with_name("joint_node.py"))
REPO = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("P2PR_JOIN_TRIALS", "200"))
TRIAL_PROCESSES = 4  # fresh process pairs the trials are spread over


class Proc(Launched):
    """A joint node process (its JSON lines in `seen`, see `p2pr.launch`)."""

    def __init__(self, *args: str) -> None:
        super().__init__([sys.executable, *args], label=f"joint node {' '.join(args)}", cwd=REPO)

    @property
    def stderr(self) -> list[str]:
        """The last lines the process wrote to its standard error."""
        return list(self.stderr_tail)

    def conn_events(self, peer: str) -> list[bool]:
        """The connection events heard so far about `peer`, in order."""
        self.fresh()
        return [line["connected"] for line in self.seen if line.get("conn") == peer]

    def stop(self, timeout: float = 10.0, terminate: bool = False) -> int:
        """Resume it if it hangs, ask it to quit, and wait (SIGKILL if it does not)."""
        if self.running():
            self.signal(signal.SIGCONT)
            with contextlib.suppress(OSError):
                self.send("quit")
        return super().stop(timeout, terminate)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def start_node(procs: list[Proc], *args: str) -> tuple[Proc, dict[str, Any]]:
    proc = Proc(NODE, *args)
    procs.append(proc)
    return proc, proc.expect(lambda line: line.get("event") == "ready", timeout=60)


def test_a_hung_peer_is_cut_and_comes_back(procs: list[Proc]) -> None:
    a, ready_a = start_node(procs)
    b, ready_b = start_node(procs, "--bootstrap", ready_a["addrs"][0])
    id_a, id_b = ready_a["node_id"], ready_b["node_id"]
    a.expect(lambda line: line.get("conn") == id_b and line["connected"], timeout=30)
    b.expect(lambda line: line.get("conn") == id_a and line["connected"], timeout=30)
    b.proc.send_signal(signal.SIGSTOP)
    a.expect(lambda line: line.get("conn") == id_b and not line["connected"], timeout=30)
    b.proc.send_signal(signal.SIGCONT)
    a.expect(
        lambda line: (
            line.get("conn") == id_b and line["connected"] and len(a.conn_events(id_b)) > 2
        ),
        timeout=60,
    )
    assert a.conn_events(id_b)[:3] == [True, False, True]
    # And messages flow again both ways.
    b.send("publish 3")
    a.expect(lambda line: line.get("got") == 3, timeout=30)
    a.send("publish 2")
    b.expect(lambda line: line.get("got") == 2, timeout=30)


def test_an_address_without_peer_id_is_enough_to_join(procs: list[Proc]) -> None:
    a, ready_a = start_node(procs)
    bare = ready_a["addrs"][0].split("/p2p/")[0]
    b, ready_b = start_node(
        procs, "--bootstrap", bare, "--bootstrap", "/ip4/127.0.0.1/udp/9", "--bootstrap", "junk"
    )
    b.expect(lambda line: line.get("conn") == ready_a["node_id"] and line["connected"], timeout=30)
    a.expect(lambda line: line.get("conn") == ready_b["node_id"] and line["connected"], timeout=30)
    assert any("ignoring peer address" in line for line in b.stderr)
    b.send("publish 4")
    a.expect(lambda line: line.get("got") == 4, timeout=30)


def test_an_observer_is_not_announced(procs: list[Proc]) -> None:
    a, ready_a = start_node(procs)
    b, ready_b = start_node(procs, "--bootstrap", ready_a["addrs"][0])
    a.expect(lambda line: line.get("conn") == ready_b["node_id"] and line["connected"], timeout=30)
    observer, ready_o = start_node(procs, "--bootstrap", ready_a["addrs"][0], "--role", "observer")
    # The observer is connected (and hears the topic: its own subscription) ...
    a.send("publish 1")
    observer.expect(lambda line: line.get("got") == 1, timeout=30)
    b.expect(lambda line: line.get("got") == 1, timeout=30)
    observer.stop()
    # ... but no member ever heard of it; they did hear of each other.
    a.send("publish 1")
    b.expect(lambda line: line.get("got") == 2, timeout=30)
    assert a.conn_events(ready_o["node_id"]) == [] and b.conn_events(ready_o["node_id"]) == []
    assert a.conn_events(ready_b["node_id"]) == [True]


def test_publishing_on_the_connection_event_loses_nothing(procs: list[Proc]) -> None:
    """Every trial: a fresh subscriber router, then a fresh publisher router that bootstraps
    from it and publishes 5 messages the moment its application hears of the connection."""
    per_pair = -(-TRIALS // TRIAL_PROCESSES)
    lost: list[tuple[int, int, list[int]]] = []
    done = 0
    for _ in range(TRIAL_PROCESSES):
        sub, pub = Proc(NODE, "--trials"), Proc(NODE, "--trials")
        procs += [sub, pub]
        for _ in range(min(per_pair, TRIALS - done)):
            sub.send("sub")
            addr = sub.expect(lambda line: "sub" in line, timeout=60)["sub"]
            sub.seen.clear()
            pub.send(f"pub {addr} 5")
            pub.expect(lambda line: "published" in line, timeout=60)
            pub.seen.clear()
            sub.send("count 5")
            count = sub.expect(lambda line: "count" in line, timeout=60)
            sub.seen.clear()
            if count["count"] != 5 or count["values"] != list(range(5)):
                lost.append((done, count["count"], count["values"]))
            for proc in (sub, pub):
                proc.send("reset")
                proc.expect(lambda line: "reset" in line, timeout=30)
                proc.seen.clear()
            done += 1
        sub.stop()
        pub.stop()
    assert done == TRIALS
    assert lost == [], f"{len(lost)} of {TRIALS} trials lost messages: {lost[:5]}"
