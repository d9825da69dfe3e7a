"""exo_swap's parts that need no exo checkout: the overlay (apply/revert on a synthetic
checkout), the exo_rs stand-ins (Pidfile across processes, bare Keypair ids), and the
check's parsing and bookkeeping (junit reports, exo's logs, agreement and split-brain
classification, the plan of starts, the summary). The checks against real exo are in test_exo_swap.py (EXO_SRC)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exo_swap.exo_rs_standin import Pidfile, PidfileError
from p2pr.exo import apply as overlay
from p2pr.exo.cluster import plan_starts, summarize
from p2pr.exo.common import wait_for
from p2pr.exo.logs import LogTail, count_keys, merge_evidence
from p2pr.exo.start import MODES, SCENARIOS
from p2pr.exo.suite import SuiteResult, _parse_junit, suite_verdict
from p2pr.exo.views import Snapshot, SplitWatch

EXO_ROUTING = ("router.py", "topics.py", "connection_message.py", "event_router.py")


def fake_checkout(root: Path) -> Path:
    routing = root / "src" / "exo" / "routing"
    routing.mkdir(parents=True)
    for name in EXO_ROUTING:
        (routing / name).write_text(f"# exo's own {name}\n")
    return root


def test_apply_overlays_and_revert_restores(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "exo")
    routing = root / "src" / "exo" / "routing"
    assert overlay.status(root) == "exo"

    done = overlay.apply(root)
    assert overlay.status(root) == "adapter"
    assert any("router.py" in line for line in done)
    shim = (routing / "router.py").read_text()
    assert "from exo_swap.routing_router import *" in shim
    assert (routing / "router.py.exo-orig").read_text() == "# exo's own router.py\n"
    assert (routing / "event_router.py").read_text() == "# exo's own event_router.py\n"
    assert "exo_swap.exo_rs_standin" in (root / "src" / "exo_rs" / "__init__.py").read_text()
    assert (root / "dashboard" / "build" / "index.html").exists()

    overlay.apply(root)  # idempotent: exo's originals are never overwritten by our shims
    assert (routing / "router.py.exo-orig").read_text() == "# exo's own router.py\n"

    overlay.revert(root)
    assert overlay.status(root) == "exo"
    for name in EXO_ROUTING:
        assert (routing / name).read_text() == f"# exo's own {name}\n"
    assert not (root / "src" / "exo_rs").exists()
    assert not (root / "dashboard" / "build" / "index.html").exists()
    assert sorted(p.name for p in routing.iterdir()) == sorted(EXO_ROUTING)


def test_bare_installs_only_the_stand_in(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "exo")
    overlay.apply(root, bare=True)
    assert overlay.status(root) == "bare"
    assert "exo_swap.exo_rs_bare" in (root / "src" / "exo_rs" / "__init__.py").read_text()
    assert (root / "src" / "exo" / "routing" / "router.py").read_text().startswith("# exo's own")


def test_apply_refuses_what_is_not_an_exo_checkout(tmp_path: Path) -> None:
    with pytest.raises(overlay.ExoCheckoutError, match="libp2p -> zenoh"):
        overlay.apply(tmp_path)
    assert overlay.main(["--exo-src", str(tmp_path)]) == 2


def test_apply_keeps_a_foreign_exo_rs(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "exo")
    (root / "src" / "exo_rs").mkdir()
    (root / "src" / "exo_rs" / "__init__.py").write_text("# the real bindings\n")
    with pytest.raises(overlay.ExoCheckoutError, match="not ours"):
        overlay.apply(root, bare=True)


def test_pidfile_writes_pid_and_removes_on_drop(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "exo.pid"
    handle = Pidfile(path, 0o600)
    handle.write()
    assert path.read_text() == str(os.getpid())
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert handle.as_raw_fd() >= 0
    del handle
    gc.collect()
    assert not path.exists()


def test_pidfile_refuses_a_second_process(tmp_path: Path) -> None:
    path = tmp_path / "exo.pid"
    child = textwrap.dedent(
        """
        import sys
        from exo_swap.exo_rs_standin import Pidfile, PidfileError
        try:
            Pidfile(sys.argv[1], 0o600).write()
        except PidfileError as exc:
            print(exc)
            raise SystemExit(73)
        """
    )
    handle = Pidfile(path, 0o600)
    handle.write()
    blocked = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=False
    )
    assert blocked.returncode == 73
    assert str(os.getpid()) in blocked.stdout
    handle.close()
    assert not path.exists()
    with pytest.raises(PidfileError):
        handle.write()
    free = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=False
    )
    assert free.returncode == 0, free.stdout + free.stderr


def test_bare_keypair_gives_libp2p_ids() -> None:
    from exo_swap.exo_rs_bare import FromSwarm, Keypair

    key = Keypair.generate()
    assert key.to_node_id().startswith("12D3KooW")
    assert Keypair.from_bytes(key.to_bytes()).to_node_id() == key.to_node_id()
    with pytest.raises(ValueError):
        Keypair.from_bytes(b"nonsense")
    match FromSwarm.Connection("peer", True):
        case FromSwarm.Connection(peer, connected):
            assert (peer, connected) == ("peer", True)


def test_junit_parsing_and_verdict(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        textwrap.dedent(
            """\
            <?xml version="1.0" encoding="utf-8"?>
            <testsuites><testsuite name="pytest">
            <testcase classname="" file="src/exo/worker/tests/test_mlx.py"
                      name="src.exo.worker.tests.test_mlx">
              <error message="collection failure">ModuleNotFoundError: mlx_lm</error>
            </testcase>
            <testcase classname="src.exo.master.tests.test_master" file="src/exo/master/tests/test_master.py" name="test_a"/>
            <testcase classname="src.exo.api.tests.test_api" file="src/exo/api/tests/test_api.py" name="test_b"/>
            <testcase classname="src.exo.api.tests.test_api" file="src/exo/api/tests/test_api.py" name="test_c">
              <failure message="assert 1 == 2">details</failure>
            </testcase>
            <testcase classname="src.exo.download.tests.t" file="src/exo/download/tests/t.py" name="test_d">
              <skipped message="skip"/>
            </testcase>
            </testsuite></testsuites>
            """
        )
    )
    result = _parse_junit("x", report, 1.0, 1)
    assert result.counts == {"passed": 2, "failed": 1, "skipped": 1}
    assert list(result.collection_errors) == ["src/exo/worker/tests/test_mlx.py"]
    assert result.area(["src/exo/api/"]) == {"passed": 1, "failed": 1}
    assert "src/exo/api/tests/test_api.py::test_c" in result.failures
    better = SuiteResult("y", {"passed": 1}, {}, {}, {}, 1.0, 0)
    problems = suite_verdict(result, better)
    assert any("adapter passes 1 tests, bare 2" in p for p in problems)
    assert any(p.startswith("api:") for p in problems)


def test_wait_for_is_bounded_and_waits_for_stability() -> None:
    values = iter([0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    value, at = wait_for(lambda: next(values), 5, stable=0.05, poll=0.01)
    assert value == 2 and at is not None
    value, at = wait_for(lambda: 0, 0.05, poll=0.01)
    assert value == 0 and at is None


def test_log_scan_reads_elections_and_failure_evidence(tmp_path: Path) -> None:
    me, other = "12D3KooWMe", "12D3KooWOther"
    log = tmp_path / "node1.1.log"
    lines = [
        "[ 03:24:26.1366PM | INFO    ] node id 12D3KooWMe (identity file /h/node_id.keypair)",
        "\x1b[32m[ 03:24:26.3809PM | INFO    ] Node elected Master - maintaining self\x1b[0m",
        "[ 03:24:26.5971PM | INFO    ] Waiting for other campaign to finish",
        "[ 03:24:26.6160PM | INFO    ] Cancelling other campaign",
        "[ 03:24:26.6165PM | INFO    ] Waiting for other campaign to finish",
        "[ 03:24:29.9219PM | INFO    ] Node 12D3KooWOther elected master - demoting self",
        "[ 03:24:30.1000PM | WARNING ] Gap(origin='x', stream='election_messages', start=3,"
        " stop=4, reason='publisher could not repair', direct=False)",
        "[ 03:24:31.0000PM | ERROR   ] node 12D3KooWOther reports another live node using MY"
        " identity 12D3KooWMe: two machines share one identity file (a cloned disk?)",
        "            | discovery.peers.PeerAddressError: '/ip4/127.0.0.1/tcp/1' has no /p2p/",
        "  | ExceptionGroup: unhandled errors in a TaskGroup (1 sub-exception)",
    ]
    tail = LogTail(log, me)
    log.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a line still being written
    first = tail.poll()
    assert (first.master, first.results, first.campaigns) == (me, 1, 1)
    assert first.logged_node_id == me
    with open(log, "a") as out:
        out.write(lines[4][20:] + "\n" + "\n".join(lines[5:]) + "\n")
    scan = tail.poll()
    assert (scan.master, scan.results, scan.campaigns) == (other, 2, 2)
    assert list(scan.gaps) == ["election_messages: publisher could not repair"]
    assert scan.duplicate_identity.count == 1
    assert scan.duplicate_identity.first_at == "03:24:31.0000PM"
    assert list(scan.exceptions) == ["PeerAddressError"]  # the group only wraps it
    assert scan.errors.count == 1
    evidence = merge_evidence([scan, scan])
    assert evidence["gaps"] == {"election_messages: publisher could not repair": 2}
    assert count_keys(evidence)["duplicate_identity"] == 2


def test_snapshot_names_the_kind_of_disagreement() -> None:
    a, b, c = "12D3KooWa", "12D3KooWb", "12D3KooWc"
    ids = frozenset({a, b, c})
    names = {a: "node1", b: "node2", c: "node3"}

    def snap(masters: list[str | None], sizes: list[int]) -> Snapshot:
        every = [a, b, c]
        return Snapshot(
            masters=dict(zip(names.values(), masters)),
            states={n: frozenset(every[:k]) for n, k in zip(names.values(), sizes)},
            names=names,
        )

    agreed = snap([b, b, b], [3, 3, 3])
    assert agreed.agreed(ids, with_state=True) == b and not agreed.split
    split = snap([a, b, b], [2, 1, 2])
    assert split.split and split.classify(ids) == "split_brain"
    assert split.follows() == {"node1": "node1", "node2": "node2", "node3": "node2"}
    assert split.details(ids)["state_missing"]["node2"] == ["node2", "node3"]
    assert snap([a, a, a], [3, 3, 3]).classify(frozenset({b, c})) == "stale_master"
    assert snap([b, b, b], [3, 2, 3]).classify(ids) == "split_state"
    assert snap([b, b, b], [2, 2, 2]).classify(ids) == "state_incomplete"
    assert snap([b, None, b], [3, 3, 3]).classify(ids) == "no_master"
    assert snap([b, b, b], [3, 2, 3]).agreed(ids, with_state=False) == b


def test_split_watch_measures_episodes() -> None:
    names = {"12D3KooWa": "node1", "12D3KooWb": "node2"}
    split = Snapshot({"node1": "12D3KooWa", "node2": "12D3KooWb"}, {}, names)
    whole = Snapshot({"node1": "12D3KooWa", "node2": "12D3KooWa"}, {}, names)
    watch = SplitWatch(started=100.0)
    watch.observe(split, 99.0, "start")  # before the first agreement: not a split
    watch.observe(whole, 99.5, "start")
    watch.armed = True
    watch.observe(split, 101.0, "start")
    watch.observe(split, 101.2, "start")
    watch.observe(whole, 101.3, "start")  # 0.3 s: counted, not listed
    watch.observe(split, 110.0, "stop")
    watch.observe(split, 115.0, "stop")
    report = watch.report(117.0)
    assert report["count"] == 2 and report["longest_s"] == 7.0  # the open one, so far
    [ongoing] = report["episodes"]
    assert ongoing["phase"] == "stop" and ongoing["ongoing"] and ongoing["seconds"] == 7.0
    assert ongoing["first"].startswith("follows node1->node1, node2->node2;")


def test_plan_cycles_every_scenario_and_mode_within_five_starts() -> None:
    plans = plan_starts(20, 0.5)
    for first in range(len(plans) - 4):
        window = plans[first : first + 5]
        assert {p.scenario for p in window} == set(SCENARIOS)
        assert {p.mode for p in window} == set(MODES)
    assert {(p.scenario, p.mode) for p in plans[:9]} == {(s, m) for s in SCENARIOS for m in MODES}
    assert [p.burn for p in plans[:4]] == [False, True, False, True]
    assert sum(p.burn for p in plans) == 10
    assert not any(p.burn for p in plan_starts(6, 0.0))
    assert all(p.burn for p in plan_starts(6, 1.0))


def test_summary_counts_and_times() -> None:
    def start(i: int, scenario: str, ok: bool, agree: float, burn: bool) -> dict[str, object]:
        return {
            "index": i,
            "scenario": scenario,
            "mode": "p2p",
            "burn": burn,
            "ok": ok,
            "failures": [] if ok else [{"kind": "split_brain", "detail": "x"}],
            "times": {"agree_s": agree},
            "evidence": {"gaps": {"election_messages: publisher could not repair": 2}},
            "splits": {"count": 1, "longest_s": 3.0 * i, "episodes": [{}] if not ok else []},
        }

    starts = [start(1, "kill", True, 4.0, False), start(2, "stop", False, 10.0, True)]
    starts.append(start(3, "kill", True, 6.0, False))
    summary = summarize(starts)
    assert (summary["starts"], summary["ok"], summary["failed"]) == (3, 2, 1)
    assert summary["by_scenario"] == {"kill": {"runs": 2, "ok": 2}, "stop": {"runs": 1, "ok": 0}}
    assert summary["failure_kinds"] == {"split_brain": 1}
    assert summary["times"]["agree_s"] == {"n": 3, "median": 6.0, "worst": 10.0}
    assert summary["times_quiet"]["agree_s"] == {"n": 2, "median": 5.0, "worst": 6.0}
    assert summary["times"]["rejoin_s"] == {"n": 0, "median": None, "worst": None}
    assert summary["evidence_starts"] == {"gaps/election_messages: publisher could not repair": 3}
    assert summary["splits"] == {"starts_with_split_over_1s": 1, "longest_s": 9.0}
