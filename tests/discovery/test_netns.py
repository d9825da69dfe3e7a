"""The network-namespace harness (tests/netns.py): three "machines" on a bridged LAN, each
with its own address and a 1 Gbit/s link; TCP between them and from the root namespace;
`p2pr node` in each, finding the others by one bootstrap address or by mDNS, seen whole by
`p2pr health` from one machine; and teardown that leaves nothing behind, also after a
failure and after a run that was killed."""

from __future__ import annotations

import json
import secrets
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
from netns import LINK_RATE_BITS, Machine, NetnsLan, _b36, sweep_leftovers

pytestmark = pytest.mark.multinode

P2PR = str(Path(sys.executable).parent / "p2pr")
WAIT = 60.0  # the bound on every wait for an event

ECHO_SERVER = """
import json, socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    conn, peer = server.accept()
    data = b""
    while len(data) < 65536:
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
    conn.sendall(data)
    conn.close()
    print(json.dumps({"peer": peer[0], "bytes": len(data)}), flush=True)
"""

ECHO_CLIENT = """
import hashlib, socket, sys
payload = bytes(range(256)) * 256
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
conn.sendall(payload)
back = b""
while len(back) < len(payload):
    piece = conn.recv(65536)
    if not piece:
        break
    back += piece
print(hashlib.sha256(back).hexdigest(), hashlib.sha256(payload).hexdigest())
"""


def read_line(stream: IO[str] | None, timeout: float) -> str:
    """One line from a child's pipe, waiting at most `timeout` seconds."""
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line within {timeout:.0f} s")
    return stream.readline()


def test_machines_have_their_own_addresses_and_capped_links(lan: NetnsLan) -> None:
    addresses = [m.address for m in lan.machines]
    assert len(set(addresses)) == 3 and lan.gateway not in addresses
    for machine in lan.machines:
        links = lan.run(machine, ["ip", "-j", "addr", "show"], timeout=WAIT).stdout
        found = {
            link["ifname"]: [a["local"] for a in link["addr_info"] if a["family"] == "inet"]
            for link in json.loads(links)
        }
        assert found == {"lo": ["127.0.0.1"], "eth0": [machine.address]}
        qdisc = lan.qdisc(machine)
        assert qdisc["kind"] == "tbf" and qdisc["options"]["rate"] * 8 == LINK_RATE_BITS
        host_side = subprocess.run(
            ["tc", "-j", "qdisc", "show", "dev", machine.host_link],
            capture_output=True, text=True, timeout=WAIT, check=True,
        )  # fmt: skip
        (root,) = [q for q in json.loads(host_side.stdout) if q.get("root")]
        assert root["kind"] == "tbf" and root["options"]["rate"] * 8 == LINK_RATE_BITS


def test_tcp_echo_between_machines_and_from_the_root_namespace(lan: NetnsLan) -> None:
    server_machine, client_machine, _ = lan.machines
    server = lan.popen(
        server_machine, [sys.executable, "-c", ECHO_SERVER, server_machine.address, "2"]
    )
    port = int(read_line(server.stdout, WAIT))
    out = lan.run(
        client_machine,
        [sys.executable, "-c", ECHO_CLIENT, server_machine.address, str(port)],
        timeout=WAIT,
    )
    got, sent = out.stdout.split()
    assert got == sent, out.stderr
    assert json.loads(read_line(server.stdout, WAIT)) == {
        "peer": client_machine.address,
        "bytes": 65536,
    }
    # The root namespace reaches the machines through the bridge's address.
    with socket.create_connection((server_machine.address, port), timeout=WAIT) as conn:
        conn.sendall(b"x" * 65536)
        conn.shutdown(socket.SHUT_WR)
        echoed = b""
        while piece := conn.recv(65536):
            echoed += piece
    assert echoed == b"x" * 65536
    assert json.loads(read_line(server.stdout, WAIT))["peer"] == lan.gateway
    assert server.wait(timeout=WAIT) == 0


def test_teardown_after_a_failure_and_of_a_killed_run(netns_available: None) -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        with NetnsLan(2) as lan:
            inside = lan.popen(lan.machines[0], ["sleep", "600"])
            raise RuntimeError("the test failed")
    assert lan.leftovers() == [] and inside.poll() is not None
    # A run killed outright leaves its namespace and bridge; the next run removes them.
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=WAIT)
    namespace, bridge = f"p2r-{gone.pid}-1-0", f"p2rb{_b36(gone.pid)}-1"
    subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=WAIT)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True, timeout=WAIT)
    removed = sweep_leftovers()
    assert namespace in removed and bridge in removed
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=WAIT)
    assert namespace not in names.stdout


def start_node(
    lan: NetnsLan, machine: Machine, secret: str, logs: Path, *extra: str
) -> dict[str, Any]:
    """`p2pr node` inside `machine`, on its own address; its ready event."""
    listen = f"/ip4/{machine.address}/tcp/0"
    process = lan.launch(
        machine,
        [
            P2PR,
            "node",
            "--identity",
            "none",
            "--listen",
            listen,
            "--cluster-secret",
            secret,
            *extra,
        ],
        label=f"node {machine.index}",
        log_path=logs / f"node-{machine.index}.log",
    )
    return process.expect("ready", WAIT)


def full_mesh(cluster: dict[str, Any], nodes: dict[str, str]) -> bool:
    """Every node's view has the others alive, at their machines' addresses."""
    for node_id in nodes:
        view = cluster["nodes"].get(node_id)
        if view is None:
            return False
        alive = {
            row["peer"]
            for row in view["peers"]
            if row["state"] == "ALIVE"
            and any(f"/ip4/{nodes[row['peer']]}/" in a for a in row.get("listen_addrs") or [])
        }
        if alive != set(nodes) - {node_id}:
            return False
    return True


def watch_health(
    lan: NetnsLan, machine: Machine, nodes: dict[str, str], *args: str
) -> dict[str, Any]:
    """`p2pr health --once --json` from `machine` until it shows the full mesh (bounded)."""
    deadline = time.monotonic() + WAIT
    cluster: dict[str, Any] = {}
    while time.monotonic() < deadline:
        out = lan.run(
            machine, [P2PR, "health", "--once", "--json", "--wait", "10", *args], timeout=WAIT
        )
        cluster = json.loads(out.stdout or "{}")
        if cluster and full_mesh(cluster, nodes):
            return cluster
    raise AssertionError(f"no full mesh of {sorted(nodes)} within {WAIT:.0f} s: {cluster}")


@pytest.mark.parametrize("discovery", ["bootstrap", "mdns"])
def test_nodes_on_three_machines_find_each_other(
    lan: NetnsLan, tmp_path: Path, discovery: str
) -> None:
    secret = secrets.token_hex(16)  # nodes of other runs on the LAN are not let in
    first = start_node(
        lan, lan.machines[0], secret, tmp_path, *(["--mdns"] if discovery == "mdns" else [])
    )
    join = ["--bootstrap", first["addrs"][0]] if discovery == "bootstrap" else ["--mdns"]
    others = [start_node(lan, m, secret, tmp_path, *join) for m in lan.machines[1:]]
    nodes = {r["node_id"]: m.address for r, m in zip([first, *others], lan.machines)}
    for ready, machine in zip([first, *others], lan.machines):
        assert all(f"/ip4/{machine.address}/tcp/" in a for a in ready["addrs"])
    cluster = watch_health(lan, lan.machines[2], nodes, "--cluster-secret", secret, *join)
    assert set(nodes) <= set(cluster["nodes"]) and cluster["duplicates"] == []
