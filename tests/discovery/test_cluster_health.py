"""Discovery, identity, cluster secrets and health across real `p2pr node` processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import P2prNode

from p2pr.launch import Launched, python_module, stop_all

pytestmark = pytest.mark.multinode


@pytest.fixture
def nodes() -> Iterator[list[P2prNode]]:
    started: list[P2prNode] = []
    yield started
    stop_all([node.process for node in started], timeout=10)


def health_once(*args: str, must_hear: bool = True) -> dict[str, Any]:
    """What `p2pr health --json --once` prints. It exits 1, saying so, when it heard no
    node's view (`must_hear`: that is a failure here)."""
    out = subprocess.run(
        [sys.executable, "-m", "p2pr", "health", "--once", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    heard = out.returncode == 0
    assert out.returncode in (0, 1) and heard == bool(result["nodes"]), out.stderr[-2000:]
    assert heard or "no view from any node" in out.stderr
    assert heard or not must_hear, out.stderr[-2000:]
    return result


def peer_state(cluster: dict[str, Any], viewer: str, peer: str) -> str | None:
    view = cluster["nodes"].get(viewer)
    if view is None:
        return None
    for row in view["peers"]:
        if row["peer"] == peer:
            return str(row["state"])
    return None


def wait_for(predicate: Any, timeout: float, step: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_join_kill_and_restart(nodes: list[P2prNode], tmp_path: Path) -> None:
    a = P2prNode("--identity", str(tmp_path / "a.key"))
    nodes.append(a)
    for name in ("b", "c"):
        nodes.append(P2prNode("--identity", str(tmp_path / f"{name}.key"), "--bootstrap", a.addr))
    members = [n.node_id for n in nodes]

    # A node that joins through bootstrap shows up, alive, in every other node's view.
    d = P2prNode("--identity", str(tmp_path / "d.key"), "--bootstrap", a.addr)
    nodes.append(d)
    joined = time.monotonic()

    def everyone_sees_d() -> dict[str, Any] | None:
        cluster = health_once("--bootstrap", a.addr)
        ok = all(peer_state(cluster, m, d.node_id) == "ALIVE" for m in members)
        return cluster if ok else None

    cluster = wait_for(everyone_sees_d, timeout=30)
    assert cluster, "the new node did not appear in every view"
    print(f"joined node visible everywhere after {time.monotonic() - joined:.1f} s")

    # SIGKILL: the others mark it dead (stream reset, then phi accrual).
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    killed = time.monotonic()

    def everyone_sees_d_dead() -> bool:
        cluster = health_once("--bootstrap", a.addr, "--wait", "2")
        return all(peer_state(cluster, m, d.node_id) == "DEAD" for m in members)

    assert wait_for(everyone_sees_d_dead, timeout=30)
    print(f"dead in every view within {time.monotonic() - killed:.1f} s (incl. CLI start-up)")

    # Restarted with the same identity file: the same peer comes back.
    d2 = P2prNode("--identity", str(tmp_path / "d.key"), "--bootstrap", a.addr)
    nodes.append(d2)
    assert d2.node_id == d.node_id
    assert wait_for(everyone_sees_d, timeout=30), "the restarted node did not come back"


def test_a_lossy_link_shows_its_loss_rate(nodes: list[P2prNode]) -> None:
    a = P2prNode("--identity", "none")
    nodes.append(a)
    nodes.append(P2prNode("--identity", "none", "--bootstrap", a.addr))
    # This node loses 30% of what reaches it (the fault shim, between protocol and libp2p).
    lossy = P2prNode("--identity", "none", "--bootstrap", a.addr, faults="drop=0.3,seed=5")
    nodes.append(lossy)

    def loss_seen() -> bool:
        cluster = health_once("--bootstrap", a.addr)
        rows = cluster["nodes"].get(lossy.node_id, {}).get("peers", [])
        return any(r["loss_ratio"] > 0 and r["nacks_sent"] > 0 for r in rows)

    assert wait_for(loss_seen, timeout=40), "the lossy node's view never showed loss"
    cluster = health_once("--bootstrap", a.addr)
    clean = [
        r["loss_ratio"]
        for node, view in cluster["nodes"].items()
        if node != lossy.node_id
        for r in view["peers"]
        if r["peer"] != lossy.node_id
    ]
    assert clean and max(clean) == 0.0  # links without faults show none


def test_wrong_cluster_secret_gets_nothing_in_or_out(nodes: list[P2prNode], tmp_path: Path) -> None:
    a = P2prNode("--identity", "none", "--cluster-secret", "ours")
    nodes.append(a)
    nodes.append(P2prNode("--identity", "none", "--cluster-secret", "ours", "--bootstrap", a.addr))
    m = P2prNode("--identity", "none", "--cluster-secret", "theirs", "--bootstrap", a.addr)
    nodes.append(m)

    def rejected_counted() -> dict[str, Any] | None:
        cluster = health_once("--bootstrap", a.addr, "--cluster-secret", "ours")
        for row in cluster["nodes"].get(a.node_id, {}).get("peers", []):
            if row["peer"] == m.node_id and row["rejections"].get("cluster secret", 0) > 0:
                return cluster
        return None

    cluster = wait_for(rejected_counted, timeout=30)
    assert cluster, "the intruder's envelopes were not counted as rejected"
    assert m.node_id not in cluster["nodes"]  # nothing of the intruder's got in
    for view in cluster["nodes"].values():
        for row in view["peers"]:
            if row["peer"] == m.node_id:
                assert row["received"] == 0  # no envelope of its was accepted

    # And nothing of ours got out to it: an observer that shares the intruder's secret hears
    # the intruder's own view, in which our node's envelopes were all refused.
    def intruders_view() -> dict[str, Any] | None:
        theirs = health_once("--bootstrap", m.addr, "--cluster-secret", "theirs", "--wait", "3")
        rows = theirs["nodes"].get(m.node_id, {}).get("peers", [])
        row = next((r for r in rows if r["peer"] == a.node_id), None)
        if row is None or row["rejections"].get("cluster secret", 0) == 0:
            return None
        return {"cluster": theirs, "row": row}

    seen = wait_for(intruders_view, timeout=30)
    assert seen, "the intruder's view never showed our node's envelopes refused"
    assert set(seen["cluster"]["nodes"]) == {m.node_id}  # no view of ours reached it
    assert seen["row"]["received"] == 0  # and no envelope of ours was accepted there


def test_one_identity_on_two_live_nodes_is_reported(nodes: list[P2prNode], tmp_path: Path) -> None:
    a = P2prNode("--identity", str(tmp_path / "a.key"))
    nodes.append(a)
    nodes.append(P2prNode("--identity", str(tmp_path / "b.key"), "--bootstrap", a.addr))
    # A cloned disk: the same key under another path (so the file lock cannot tell).
    shutil.copy(tmp_path / "b.key", tmp_path / "clone.key")
    clone = P2prNode("--identity", str(tmp_path / "clone.key"), "--bootstrap", a.addr)
    nodes.append(clone)

    def reported() -> bool:
        cluster = health_once("--bootstrap", a.addr)
        return clone.node_id in cluster["duplicates"]

    assert wait_for(reported, timeout=30)


def test_same_identity_file_twice_on_one_machine_is_refused(tmp_path: Path) -> None:
    first = P2prNode("--identity", str(tmp_path / "a.key"))
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2pr",
                "node",
                "--identity",
                str(tmp_path / "a.key"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert "in use by another live node" in second.stderr
    finally:
        first.stop()


NETNS = ["p2pr-test-a", "p2pr-test-b"]


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def two_namespaces() -> Iterator[list[str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("mDNS is tested in network namespaces, which need root and iproute2")
    for ns in NETNS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        for ns in NETNS:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", "p2pr-va", "type", "veth", "peer", "name", "p2pr-vb")
        for ns, dev, ip in zip(NETNS, ("p2pr-va", "p2pr-vb"), ("10.231.7.1", "10.231.7.2")):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr}")
    yield ["10.231.7.1", "10.231.7.2"]
    for ns in NETNS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_mdns_finds_peers_in_a_network_namespace(two_namespaces: list[str]) -> None:
    # Multicast does not work on loopback, so two namespaces joined by a veth pair stand
    # in for two machines on one LAN. No bootstrap address is given: only mDNS.
    procs = []
    try:
        ready = []
        for ns, ip in zip(NETNS, two_namespaces):
            listen = f"/ip4/{ip}/tcp/0"
            args = ["node", "--identity", "none", "--mdns", "--listen", listen]
            procs.append(
                Launched(
                    ["ip", "netns", "exec", ns, *python_module("p2pr", *args)],
                    label=f"p2pr node in {ns}",
                )
            )
            ready.append(procs[-1].expect("ready", 60))
        a_id, b_id = ready[0]["node_id"], ready[1]["node_id"]

        def found() -> bool:
            out = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    NETNS[0],
                    sys.executable,
                    "-m",
                    "p2pr",
                    "health",
                    "--once",
                    "--json",
                    "--bootstrap",
                    ready[0]["addrs"][0],
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            cluster = json.loads(out.stdout or "{}")
            return peer_state(cluster, a_id, b_id) == "ALIVE"

        assert wait_for(found, timeout=40), "the nodes did not find each other over mDNS"
    finally:
        stop_all(procs, timeout=10)
