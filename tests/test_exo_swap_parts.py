"""exo_swap's parts that need no exo checkout: the overlay (apply/revert on a synthetic
checkout), the exo_rs stand-ins (Pidfile across processes, bare Keypair ids), and the
check's report parsing. The checks against real exo are in test_exo_swap.py (EXO_SRC)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exo_swap import apply as overlay
from exo_swap.check import SuiteResult, _parse_junit, suite_verdict, wait_for
from exo_swap.exo_rs_standin import Pidfile, PidfileError

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
