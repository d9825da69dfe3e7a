"""Identity files, peer addresses, the dial planner and cluster views: no network needed."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from discovery.health import DUPLICATE_WINDOW, ClusterViews, HealthView
from discovery.identity import IdentityError, IdentityInUseError, load_identity
from discovery.peers import (
    BOOTSTRAP_ENV,
    PeerAddressError,
    bootstrap_addrs,
    read_peers_file,
)
from router.dialplan import DialPlanner

A = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWGzBxq6pJk2Yx3bV5qzfs4s9kbc6HhQ9d3w4m1pLr8vTe"
B = "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWRDhYmw7tW8muSSogHzh6Y7JpEAEUYbQ571DVoW4e6Qvb"


def test_identity_is_created_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "id" / "node.key"
    first = load_identity(path)
    node_id = first.node_id
    assert node_id.startswith("12D3KooW")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(IdentityInUseError, match="in use by another live node"):
        load_identity(path)  # same file, second live user
    first.release()
    again = load_identity(path)
    assert again.node_id == node_id  # a restart keeps the id
    assert again.instance != first.instance  # but is a new run
    again.release()


def test_corrupt_identity_is_an_error_not_a_new_id(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an ed25519 secret key"):
        load_identity(path)
    assert path.read_bytes() == b"not a key"


def test_identity_file_is_private_from_birth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(os.stat(src).st_mode & 0o777)  # the key, written, before its rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old_umask = os.umask(0)  # the most permissive umask there is
    try:
        load_identity(tmp_path / "node.key").release()
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


def test_identity_file_problems_are_identity_errors(tmp_path: Path) -> None:
    shared = tmp_path / "shared.key"
    load_identity(shared).release()
    shared.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_identity(shared)
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(IdentityError, match="is a directory"):
        load_identity(tmp_path / "dir.key")
    locked_dir = tmp_path / "locked"
    locked_dir.mkdir()
    (locked_dir / "node.key").write_bytes(b"x")
    (locked_dir / "node.key").chmod(0o600)
    locked_dir.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root can write anywhere
            with pytest.raises(IdentityError):
                load_identity(locked_dir / "node.key")
    finally:
        locked_dir.chmod(0o700)


def _race(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import time

    for _ in range(200):
        try:
            identity = load_identity(path)
        except IdentityInUseError:
            time.sleep(0.01)
            continue
        queue.put(identity.node_id)
        identity.release()
        return
    queue.put(None)


def test_processes_racing_to_create_share_one_identity(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "k"), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert None not in ids and len(set(ids)) == 1


def test_bootstrap_from_flags_and_environment() -> None:
    env = {BOOTSTRAP_ENV: f" {B} ,{A}"}
    assert bootstrap_addrs([A], env) == [A, B]
    assert bootstrap_addrs([], {}) == []
    # As exo's networking did, an address without /p2p/ is taken: the handshake tells the id.
    assert bootstrap_addrs(["/ip4/127.0.0.1/tcp/1"], {}) == ["/ip4/127.0.0.1/tcp/1"]
    with pytest.raises(PeerAddressError, match="not a multiaddr"):
        bootstrap_addrs(["nonsense"], {})
    for not_tcp in (
        "/ip4/127.0.0.1/udp/1",
        "/ip4/127.0.0.1",
        f"/ip4/1.2.3.4/tcp/1/ws/p2p/{B[-52:]}",
    ):
        with pytest.raises(PeerAddressError):
            bootstrap_addrs([not_tcp], {})


def test_static_peers_file(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text(f"# the cluster\n{A}\n\n{B}  # the second\n{A}\n")
    assert read_peers_file(path) == [A, B]
    path.write_text("/ip4/1.2.3.4/udp/1\n")
    with pytest.raises(PeerAddressError, match=str(path)):
        read_peers_file(path)


def test_dial_planner_backs_off_and_forgets_stale_discoveries() -> None:
    planner = DialPlanner(base=1.0, cap=8.0, drop_after=3, seed=1)
    stale = "/ip4/127.0.0.1/tcp/9999/p2p/12D3KooWRDhYmw7tW8muSSogHzh6Y7JpEAEUYbQ571DVoW4e6Qvb"
    assert planner.add(A, "bootstrap", 0.0) and planner.add(stale, "mdns", 0.0)
    assert not planner.add(A, "mdns", 0.0)  # known already
    now = 0.0
    waits = []
    for _ in range(6):
        due = {s.addr for s in planner.due(now, connected=[])}
        assert due  # something is always due at the planner's own next_time
        for addr in due:
            planner.on_result(addr, ok=False, now=now)
        nxt = planner.next_time()
        assert nxt is not None and nxt > now
        waits.append(nxt - now)
        now = nxt
    assert stale in planner.dropped and stale not in planner.addresses  # mDNS leftovers go
    assert A in planner.addresses  # configured addresses stay, retried ever more rarely
    assert planner.addresses[A].failures >= 3
    assert max(waits) <= 8.0


def test_dial_planner_skips_connected_and_in_flight_peers() -> None:
    planner = DialPlanner(seed=2)
    planner.add(A, "static", 0.0)
    planner.add(B, "static", 0.0)
    peer_a = A.rsplit("/", 1)[1]
    due = planner.due(0.0, connected=[peer_a])
    assert [s.addr for s in due] == [B]
    assert planner.due(0.0, connected=[]) == [planner.addresses[A]]  # B is in flight
    planner.on_result(B, ok=True, now=1.0)
    planner.on_disconnected(B.rsplit("/", 1)[1], 2.0)
    assert B in {s.addr for s in planner.due(10.0, connected=[])}


def _view(node: str, instance: str, sent: float, dups: list[str] | None = None) -> HealthView:
    return HealthView(node, instance, "node", (), sent, (), tuple(dups or ()))


def test_two_live_instances_of_one_id_are_a_duplicate() -> None:
    views = ClusterViews("me", "i0")
    # Two machines with one key: both keep publishing, so their views interleave.
    for t in range(100, 104):
        views.add(_view("x", "run1", t), now=t)
        views.add(_view("x", "run2", t + 0.5), now=t + 0.5)
    assert views.first_hand(now=104.0) == ["x"]
    assert views.duplicates(now=104.0) == ["x"]
    # The evidence expires once one of them stops.
    later = 104.0 + DUPLICATE_WINDOW + 1
    views.add(_view("x", "run2", later), now=later)
    assert views.first_hand(now=later) == []


def test_a_restart_or_a_pause_is_not_a_duplicate() -> None:
    views = ClusterViews("me", "i0")
    for t in range(100, 104):
        views.add(_view("x", "run1", t), now=t)
    # A restart: the old run stops, the new one goes on.
    for t in range(105, 110):
        views.add(_view("x", "run2", t), now=t)
    # A pause: one run falls silent for a while and comes back.
    for t in [*range(100, 103), *range(110, 115)]:
        views.add(_view("y", "run", t), now=t)
    assert views.first_hand(now=115.0) == [] and views.duplicates(now=115.0) == []


def test_another_run_of_my_own_identity_is_reported_first_hand_only() -> None:
    views = ClusterViews("me", "i0")
    for t in range(100, 104):
        views.add(_view("me", "i0", t), now=t)  # our own view, looped back
        views.add(_view("me", "clone", t + 0.5), now=t + 0.5)
    assert views.first_hand(now=104.0) == ["me"]
    # What others report is shown (p2pr health), but never repeated as our own evidence:
    # reports that echo each other would never clear.
    other = ClusterViews("you", "j0")
    other.add(_view("z", "r", 200.0, dups=["me"]), now=200.0)
    assert other.duplicates(now=200.0) == ["me"]
    assert other.first_hand(now=200.0) == []
