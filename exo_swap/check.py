"""Check the adapter against a real exo checkout: `python -m exo_swap.check --exo-src DIR`.

Run it with the Python 3.13 interpreter that has exo's dependencies and this project
installed. It never modifies DIR: it copies the checkout twice into a work folder, applies
the bare `exo_rs` stand-in to one copy and the adapter to the other, and then

1. runs exo's own test suite (pytest, `src/`) in each copy and compares: the adapter run
   must pass at least as many tests as the bare run, and the routing, election, master, API
   and download tests must all pass with the adapter;
2. starts a live 3-node exo cluster on 127.0.0.1 from the adapter copy (`python -m exo`
   three times, each with its own HOME, API port and listen port, bootstrap peers pointing
   at the others, no downloads), waits until all three agree on one master and every node's
   API state lists all three nodes, reads `p2pr health`, SIGKILLs the master, and waits
   until the two others elect a new one and keep answering.

exo adds a node to its state only from that node's worker (`NodeGatheredInfo`), so the
cluster runs exo's worker by default (no model is placed, so it only gathers system info);
`--no-worker` runs exactly as the issue says and then reports the state check as n/a.

Every wait is bounded; every process started is stopped (its process group) at the end.
Exit status: 0 when every check passed, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from .apply import apply, checkout, revert, status

REPO_ROOT = Path(__file__).resolve().parent.parent

# Test files that must pass with the adapter (paths under the exo checkout).
REQUIRED_AREAS = {
    "routing": ("src/exo/routing/",),
    "election": ("src/exo/shared/tests/test_election.py",),
    "master": ("src/exo/master/",),
    "api": ("src/exo/api/",),
    "download": ("src/exo/download/",),
}

SUITE_TIMEOUT = 1200.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SELF_MASTER = re.compile(r"Node elected Master - (?:maintaining|promoting) self")
_OTHER_MASTER = re.compile(r"Node (12D3KooW\w+) elected master")


# ---------------------------------------------------------------------------- work copies


def _copy_checkout(exo_src: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", "node_modules", "target", "__pycache__", ".venv", ".pytest_cache"
    )
    shutil.copytree(exo_src, dest, ignore=ignore, symlinks=True)
    if status(dest) != "exo":
        revert(dest)
    return dest


def prepare_copies(exo_src: Path, work: Path) -> tuple[Path, Path]:
    """Two copies of the checkout: bare stand-in and adapter."""
    checkout(exo_src)
    bare = _copy_checkout(exo_src, work / "exo-bare")
    apply(bare, bare=True)
    swapped = _copy_checkout(exo_src, work / "exo-adapter")
    apply(swapped)
    return bare, swapped


def exo_env(copy: Path, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for exo processes of one copy: its src first, a HOME of its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EXO_", "XDG_", "P2PR_")) and k not in ("PYTHONPATH", "HOME")
    }
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        PYTHONPATH=os.pathsep.join([str(copy / "src"), str(REPO_ROOT)]),
        PYTHONUNBUFFERED="1",
        BROWSER="true",  # exo opens its dashboard in a browser on first run
    )
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------- exo's suite


@attrs.frozen
class SuiteResult:
    """One pytest run of exo's suite."""

    name: str
    counts: dict[str, int]  # passed, failed, error, skipped
    files: dict[str, dict[str, int]]  # test file -> counts
    collection_errors: dict[str, str]  # test file -> first line of the error
    failures: dict[str, str]  # test id -> first line
    seconds: float
    returncode: int

    @property
    def passed(self) -> int:
        return self.counts.get("passed", 0)

    def area(self, prefixes: Sequence[str]) -> dict[str, int]:
        total: Counter[str] = Counter()
        for path, counts in self.files.items():
            if path.startswith(tuple(prefixes)):
                total.update(counts)
        for path in self.collection_errors:
            if path.startswith(tuple(prefixes)):
                total["error"] += 1
        return dict(total)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "counts": self.counts,
            "collection_errors": self.collection_errors,
            "failures": self.failures,
            "seconds": round(self.seconds, 1),
            "returncode": self.returncode,
            "areas": {area: self.area(prefixes) for area, prefixes in REQUIRED_AREAS.items()},
        }


def run_suite(name: str, copy: Path, work: Path, python: str) -> SuiteResult:
    """exo's pytest suite in `copy` (its own pyproject settings, plus junit output)."""
    report = work / f"junit-{name}.xml"
    log = work / f"pytest-{name}.log"
    cmd = [
        python,
        "-m",
        "pytest",
        "src",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:trio",  # our test extra installs pytest-trio; exo's suite is asyncio
        "--continue-on-collection-errors",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={report}",
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd,
            cwd=copy,
            env=exo_env(copy, work / f"home-{name}"),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SUITE_TIMEOUT,
            check=False,
        )
    seconds = time.monotonic() - started
    if not report.exists():
        raise RuntimeError(f"pytest wrote no report ({name}); see {log}")
    return _parse_junit(name, report, seconds, proc.returncode)


def _parse_junit(name: str, report: Path, seconds: float, returncode: int) -> SuiteResult:
    counts: Counter[str] = Counter()
    files: dict[str, Counter[str]] = {}
    collection: dict[str, str] = {}
    failures: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("file") or ""
        classname = case.get("classname") or ""
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().split("\n")[0]
                break
        if not classname and outcome == "error":  # a file that failed to load
            file_path = case.get("name", "").replace(".", "/") + ".py"
            collection[path or file_path] = _load_error(case) or message
            continue
        counts[outcome] += 1
        files.setdefault(path, Counter())[outcome] += 1
        if outcome in ("failed", "error"):
            failures[f"{path}::{case.get('name')}"] = message
    return SuiteResult(
        name=name,
        counts=dict(counts),
        files={path: dict(c) for path, c in files.items()},
        collection_errors=collection,
        failures=failures,
        seconds=seconds,
        returncode=returncode,
    )


def _load_error(case: ET.Element) -> str:
    """The exception line of a collection error ("ModuleNotFoundError: …")."""
    for child in case:
        lines = (child.text or "").splitlines()
        for line in reversed(lines):
            text = line.removeprefix("E").strip()
            if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", text):
                return text
    return ""


def suite_verdict(bare: SuiteResult, adapter: SuiteResult) -> list[str]:
    """What is wrong (empty: the adapter run is at least as good, required areas pass)."""
    problems = []
    if adapter.passed < bare.passed:
        problems.append(f"adapter passes {adapter.passed} tests, bare {bare.passed}")
    for area, prefixes in REQUIRED_AREAS.items():
        counts = adapter.area(prefixes)
        if not counts.get("passed"):
            problems.append(f"{area}: no test passed")
        if counts.get("failed") or counts.get("error"):
            problems.append(f"{area}: {counts}")
    return problems


# ---------------------------------------------------------------------------- self-test


def run_selftest(copy: Path, work: Path, python: str) -> dict[str, Any]:
    """`python -m exo_swap.selftest --json` in the adapter copy."""
    proc = subprocess.run(
        [python, "-m", "exo_swap.selftest", "--json"],
        cwd=copy,
        env=exo_env(copy, work / "home-selftest"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            result: dict[str, Any] = json.loads(line)
            return result
    return {"ok": False, "error": f"no result (exit {proc.returncode}): {proc.stderr[-2000:]}"}


def selftest_table(result: dict[str, Any]) -> str:
    rows = [("two adapter Routers, exo's topics and types", "result", "")]
    for key, value in result.items():
        if key not in ("ok", "failed", "error"):
            rows.append((f"  {key}", str(value), ""))
    rows.append(("error", str(result.get("error") or "none"), ""))
    return _table(rows)


# ---------------------------------------------------------------------------- live cluster


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together so that they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@attrs.define
class ExoNode:
    """One `python -m exo` process of the live cluster."""

    index: int
    node_id: str
    home: Path
    api_port: int
    libp2p_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    killed_at: float | None = None

    @property
    def multiaddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.libp2p_port}/p2p/{self.node_id}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def master(self) -> str | None:
        """The master this node's exo last reported electing (from its log)."""
        try:
            text = _ANSI.sub("", self.log.read_text(errors="replace"))
        except OSError:
            return None
        last: tuple[int, str] | None = None
        for match in _SELF_MASTER.finditer(text):
            if last is None or match.start() > last[0]:
                last = (match.start(), self.node_id)
        for match in _OTHER_MASTER.finditer(text):
            if last is None or match.start() > last[0]:
                last = (match.start(), match.group(1))
        return last[1] if last else None

    def api(self, path: str) -> Any:
        return _http_json(f"http://127.0.0.1:{self.api_port}{path}")

    def state_nodes(self) -> set[str] | None:
        try:
            state = self.api("/state")
        except (OSError, ValueError):
            return None
        return set(state.get("topology", {}).get("nodes", [])) | set(
            state.get("nodeIdentities", {})
        )

    def answers(self) -> bool:
        try:
            return bool(self.api("/node_id") == self.node_id)
        except (OSError, ValueError):
            return False


def _make_identity(home: Path) -> str:
    """Create the node's persistent identity where exo (through the adapter) will find it."""
    from discovery.identity import load_identity  # our router's identity, not exo's

    identity = load_identity(home / ".config" / "exo" / "node_id.keypair")
    node_id = identity.node_id
    identity.release()
    return node_id


@contextlib.contextmanager
def exo_cluster(
    copy: Path, work: Path, python: str, *, size: int = 3, worker: bool = True
) -> Iterator[list[ExoNode]]:
    """Start `size` exo nodes on 127.0.0.1; stop every one of them (process group) after."""
    ports = free_ports(2 * size)
    nodes = []
    for i in range(size):
        home = work / f"node{i + 1}"
        home.mkdir(parents=True, exist_ok=True)
        nodes.append(
            ExoNode(
                index=i + 1,
                node_id=_make_identity(home),
                home=home,
                api_port=ports[2 * i],
                libp2p_port=ports[2 * i + 1],
                log=work / f"node{i + 1}.log",
            )
        )
    try:
        for node in nodes:
            peers = ",".join(n.multiaddr for n in nodes if n is not node)
            cmd = [python, "-m", "exo", "--no-downloads", "--api-port", str(node.api_port)]
            cmd += ["--libp2p-port", str(node.libp2p_port), "--bootstrap-peers", peers]
            if not worker:
                cmd.append("--no-worker")
            env = exo_env(
                copy,
                node.home,
                {"EXO_P2PR_MDNS": "0", "EXO_P2PR_LISTEN_HOST": "127.0.0.1"},
            )
            with open(node.log, "wb") as out:
                node.proc = subprocess.Popen(
                    cmd,
                    cwd=copy,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group, stopped as one
                )
        yield nodes
    finally:
        for node in nodes:
            _signal_group(node, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=5)


def _signal_group(node: ExoNode, sig: int) -> None:
    if node.proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.proc.pid, sig)  # the group we created for it (start_new_session)


def wait_for(
    condition: Callable[[], Any], timeout: float, *, stable: float = 0.0, poll: float = 0.25
) -> tuple[Any, float | None]:
    """Poll until `condition()` is truthy (and stays equal for `stable` seconds).

    Returns (value, the time.monotonic() at which the final value first held) or
    (last value, None) on timeout.
    """
    deadline = time.monotonic() + timeout
    first: float | None = None
    held: Any = None
    value: Any = None
    while time.monotonic() < deadline:
        value = condition()
        now = time.monotonic()
        if value:
            if first is None or value != held:
                first, held = now, value
            if now - first >= stable:
                return value, first
        else:
            first, held = None, None
        time.sleep(poll)
    return value, None


def _agreed_master(nodes: Sequence[ExoNode]) -> str | None:
    alive = [n for n in nodes if n.alive]
    masters = {n.master() for n in alive}
    if len(masters) == 1:
        master = masters.pop()
        if master in {n.node_id for n in alive}:
            return master
    return None


def p2pr_command(python: str) -> list[str]:
    """This project's `p2pr` command: its own .venv's when there is one, else through
    exo's Python (with the anyio compatibility shim)."""
    own = REPO_ROOT / ".venv" / "bin" / "p2pr"
    if own.exists():
        return [str(own)]
    code = "import sys, exo_swap; from p2p_reliable.cli import main; sys.exit(main())"
    return [python, "-c", code]


def run_p2pr_health(node: ExoNode, p2pr: Sequence[str], *, as_json: bool) -> tuple[Any, str]:
    """`p2pr health --once` against one exo node: (the JSON or the table, stderr's tail)."""
    cmd = [*p2pr, "health", "--bootstrap", node.multiaddr, "--once", "--wait", "8"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PR_")}
    out = subprocess.run(
        [*cmd, "--json"] if as_json else cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    if not as_json:
        return out.stdout.strip(), out.stderr[-2000:]
    for line in reversed(out.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            return json.loads(line), out.stderr[-2000:]
    return {}, out.stderr[-2000:]


def p2pr_health_nodes(
    node: ExoNode, p2pr: Sequence[str], ids: set[str], attempts: int = 3, *, table: bool = True
) -> tuple[dict[str, Any], str, int]:
    """`p2pr health --once --json` until it shows every node of `ids` (bounded retries: a
    snapshot can miss views while an observer is still joining a busy cluster), then the
    same as a table. Returns (JSON, table, attempts used)."""
    data: dict[str, Any] = {}
    used = 0
    while used < attempts:
        used += 1
        data, _ = run_p2pr_health(node, p2pr, as_json=True)
        if ids <= set(data.get("nodes", {})):
            break
    text = ""
    for _ in range(attempts if table else 0):
        text, _ = run_p2pr_health(node, p2pr, as_json=False)
        if f"{len(ids)} nodes" in text:
            break
    return data, text, used


def live_cluster(
    copy: Path,
    work: Path,
    python: str,
    *,
    worker: bool = True,
    p2pr: Sequence[str] | None = None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The live scenario; returns every measurement and a list of problems."""
    p2pr = list(p2pr or p2pr_command(python))
    result: dict[str, Any] = {"worker": worker, "problems": [], "p2pr": " ".join(p2pr)}
    problems: list[str] = result["problems"]
    started = time.monotonic()
    with exo_cluster(copy, work / "cluster", python, worker=worker) as nodes:
        result["nodes"] = [
            {
                "node": n.index,
                "node_id": n.node_id,
                "api_port": n.api_port,
                "libp2p_port": n.libp2p_port,
            }
            for n in nodes
        ]
        ids = {n.node_id for n in nodes}

        answering, t_api = wait_for(lambda: all(n.answers() for n in nodes), 120)
        result["api_up_s"] = _since(started, t_api)
        log(f"APIs answering: {bool(answering)} after {result['api_up_s']} s")
        if not answering:
            problems.append("not every exo API answered within 120 s")
            return result

        master, t_master = wait_for(lambda: _agreed_master(nodes), 90, stable=4.0)
        result["master"] = master
        result["agree_master_s"] = _since(started, t_master)
        log(f"agreed master: {master} after {result['agree_master_s']} s")
        if master is None:
            problems.append(
                "the nodes did not agree on one master: "
                + ", ".join(f"node{n.index}={n.master()}" for n in nodes)
            )

        if worker:
            listed, t_listed = wait_for(
                lambda: all((n.state_nodes() or set()) >= ids for n in nodes), 90
            )
            result["state_all_nodes_s"] = _since(started, t_listed)
            result["state_nodes"] = {n.index: len(n.state_nodes() or ()) for n in nodes}
            log(f"state lists all nodes: {bool(listed)} ({result['state_nodes']})")
            if not listed:
                problems.append(f"API state does not list all nodes: {result['state_nodes']}")
        else:
            result["state_nodes"] = {n.index: len(n.state_nodes() or ()) for n in nodes}

        health, table, attempts = p2pr_health_nodes(nodes[0], p2pr, ids)
        health_nodes = set(health.get("nodes", {}))
        result["health_nodes"] = sorted(health_nodes & ids)
        result["health_attempts"] = attempts
        result["health_table"] = table
        log(f"p2pr health shows {len(health_nodes & ids)} exo nodes ({attempts} snapshot(s))")
        if not ids <= health_nodes:
            problems.append(f"p2pr health shows {len(health_nodes & ids)} of the exo nodes")

        if master is None:
            return result
        victim = next(n for n in nodes if n.node_id == master)
        survivors = [n for n in nodes if n is not victim]
        killed = time.monotonic()
        _signal_group(victim, signal.SIGKILL)
        if victim.proc is not None:
            victim.proc.wait(timeout=10)
        victim.killed_at = killed
        result["killed"] = victim.node_id
        log(f"SIGKILL master node{victim.index}")

        failures: Counter[int] = Counter()

        def reelected() -> str | None:
            for n in survivors:
                if not n.answers():
                    failures[n.index] += 1
            new = _agreed_master(survivors)
            return new if new and new != victim.node_id else None

        new_master, t_new = wait_for(reelected, 90, stable=4.0)
        result["new_master"] = new_master
        result["reelect_s"] = _since(killed, t_new)
        result["api_failures_after_kill"] = dict(failures)
        log(f"new master: {new_master} after {result['reelect_s']} s")
        if new_master is None:
            problems.append(
                "the survivors did not elect a new master: "
                + ", ".join(f"node{n.index}={n.master()}" for n in survivors)
            )
        answering_after = [n.index for n in survivors if n.answers()]
        result["answering_after_kill"] = answering_after
        if len(answering_after) != len(survivors):
            problems.append(f"only nodes {answering_after} answer after the kill")
        survivor_ids = {n.node_id for n in survivors}
        if worker:
            listed_after, t_after = wait_for(
                lambda: all(n.state_nodes() == survivor_ids for n in survivors), 60
            )
            result["state_after_kill_s"] = _since(killed, t_after)
            result["state_nodes_after_kill"] = {
                n.index: len(n.state_nodes() or ()) for n in survivors
            }
            if not listed_after:
                problems.append(
                    f"survivors' state does not list them: {result['state_nodes_after_kill']}"
                )
        health_after, _, _ = p2pr_health_nodes(
            survivors[0], p2pr, survivor_ids, attempts=2, table=False
        )
        views = health_after.get("nodes", {})
        result["health_after_kill"] = {
            node_id: sorted(
                {
                    p["peer"][-8:]: p["state"] for p in view.get("peers", []) if p["peer"] in ids
                }.items()
            )
            for node_id, view in views.items()
            if node_id in ids
        }
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _since(start: float, at: float | None) -> float | None:
    return None if at is None else round(at - start, 2)


# ---------------------------------------------------------------------------- report


def _short(node_id: str | None) -> str:
    return "-" if not node_id else f"…{node_id[-8:]}"


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def suite_table(bare: SuiteResult, adapter: SuiteResult) -> str:
    rows = [("exo's tests (pytest src/)", "bare exo_rs stand-in", "adapter")]

    def fmt(counts: dict[str, int]) -> str:
        keys = ("passed", "failed", "error", "skipped")
        return ", ".join(f"{counts.get(k, 0)} {k}" for k in keys if counts.get(k) or k == "passed")

    rows.append(("whole suite", fmt(bare.counts), fmt(adapter.counts)))
    rows.append(
        (
            "files that fail to load",
            str(len(bare.collection_errors)),
            str(len(adapter.collection_errors)),
        )
    )
    for area, prefixes in REQUIRED_AREAS.items():
        rows.append((f"  {area}", fmt(bare.area(prefixes)), fmt(adapter.area(prefixes))))
    rows.append(("seconds", f"{bare.seconds:.0f}", f"{adapter.seconds:.0f}"))
    return _table(rows)


def cluster_table(result: dict[str, Any]) -> str:
    def secs(key: str) -> str:
        value = result.get(key)
        return "-" if value is None else f"{value:.1f} s"

    nodes = result.get("nodes", [])
    rows = [("live 3-node exo cluster (127.0.0.1)", "result", "time")]
    for n in nodes:
        rows.append(
            (
                f"  node{n['node']}",
                f"{n['node_id']}  api :{n['api_port']}  libp2p :{n['libp2p_port']}",
                "",
            )
        )
    rows.append(
        (
            "exo APIs answering",
            "3/3" if result.get("api_up_s") is not None else "no",
            secs("api_up_s"),
        )
    )
    rows.append(("all agree on one master", _short(result.get("master")), secs("agree_master_s")))
    state = result.get("state_nodes", {})
    if result.get("worker"):
        rows.append(
            (
                "every API state lists all 3 nodes",
                "/".join(str(v) for v in state.values()),
                secs("state_all_nodes_s"),
            )
        )
    else:
        rows.append(("every API state lists all 3 nodes", "n/a (--no-worker)", ""))
    rows.append(
        (
            "p2pr health shows the exo nodes",
            f"{len(result.get('health_nodes', []))}/3"
            f" ({result.get('health_attempts', 0)} snapshot(s))",
            "",
        )
    )
    if "killed" in result:
        rows.append(("SIGKILL the master", _short(result.get("killed")), "t=0"))
        rows.append(
            ("survivors elect a new master", _short(result.get("new_master")), secs("reelect_s"))
        )
        failures = result.get("api_failures_after_kill", {})
        rows.append(
            (
                "survivors' APIs keep answering",
                f"{len(result.get('answering_after_kill', []))}/2"
                + (f" (failed polls {failures})" if failures else " (no failed poll)"),
                "",
            )
        )
        if result.get("worker"):
            after = result.get("state_nodes_after_kill", {})
            rows.append(
                (
                    "survivors' state lists exactly the survivors",
                    "/".join(str(v) for v in after.values()),
                    secs("state_after_kill_s"),
                )
            )
    rows.append(("problems", "; ".join(result.get("problems", [])) or "none", ""))
    return _table(rows)


# ---------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exo_swap.check",
        description="exo's tests bare vs with the adapter, and a live 3-node exo cluster "
        "over p2p-reliable. Run with exo's Python 3.13 environment.",
    )
    parser.add_argument(
        "--exo-src", default=os.environ.get("EXO_SRC"), help="exo checkout (or EXO_SRC)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--suite", action="store_true", help="only exo's test suites")
    parser.add_argument("--cluster", action="store_true", help="only the live cluster")
    parser.add_argument(
        "--selftest", action="store_true", help="only two adapter Routers with exo's types"
    )
    parser.add_argument("--no-worker", action="store_true", help="run exo with --no-worker")
    parser.add_argument("--python", default=sys.executable, help="exo's Python 3.13")
    parser.add_argument(
        "--p2pr", default=None, help="the p2pr command (default: this repository's .venv/bin/p2pr)"
    )
    parser.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not args.exo_src:
        print("exo_swap.check: give --exo-src DIR (or set EXO_SRC)", file=sys.stderr)
        return 2
    exo_src = Path(args.exo_src).expanduser().resolve()
    everything = not (args.suite or args.cluster or args.selftest)
    do_suite, do_cluster = args.suite or everything, args.cluster or everything
    do_selftest = args.selftest or everything

    def log(line: str) -> None:
        if not args.json:
            print(line, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="exo-swap-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"exo_src": str(exo_src), "work": str(work), "problems": []}
    try:
        bare_copy, adapter_copy = prepare_copies(exo_src, work)
        if do_suite:
            log("running exo's tests with the bare exo_rs stand-in …")
            bare = run_suite("bare", bare_copy, work, args.python)
            log(f"  {bare.counts} in {bare.seconds:.0f} s")
            log("running exo's tests with the adapter …")
            adapter = run_suite("adapter", adapter_copy, work, args.python)
            log(f"  {adapter.counts} in {adapter.seconds:.0f} s")
            out["suite"] = {"bare": bare.to_json(), "adapter": adapter.to_json()}
            out["problems"] += suite_verdict(bare, adapter)
            if not args.json:
                print()
                print(suite_table(bare, adapter))
                if adapter.collection_errors:
                    print("\nfiles that fail to load (adapter run):")
                    for path, message in sorted(adapter.collection_errors.items()):
                        print(f"  {path}: {message}")
                print()
        if do_selftest:
            log("two adapter Routers with exo's topics and types …")
            selftest = run_selftest(adapter_copy, work, args.python)
            out["selftest"] = selftest
            if not selftest.get("ok"):
                out["problems"].append(
                    f"selftest failed: {selftest.get('failed')} {selftest.get('error') or ''}"
                )
            if not args.json:
                print()
                print(selftest_table(selftest))
                print()
        if do_cluster:
            log("starting a live 3-node exo cluster over p2p-reliable …")
            cluster = live_cluster(
                adapter_copy,
                work,
                args.python,
                worker=not args.no_worker,
                p2pr=args.p2pr.split() if args.p2pr else None,
                log=log,
            )
            out["cluster"] = cluster
            out["problems"] += cluster["problems"]
            if not args.json:
                print()
                print(cluster_table(cluster))
                if cluster.get("health_table"):
                    print("\np2pr health (before the kill):")
                    print(cluster["health_table"])
                if cluster.get("health_after_kill"):
                    print("\np2pr health after the kill (each survivor's view of the others):")
                    for node_id, peers in cluster["health_after_kill"].items():
                        print(f"  {_short(node_id)}: {dict(peers)}")
    except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        out["problems"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out["ok"] = not out["problems"]
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print("\n" + ("OK" if out["ok"] else "FAILED: " + "; ".join(out["problems"])))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
