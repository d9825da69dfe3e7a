"""`p2pr health` as an observer of a settled exo cluster: it must show the exo nodes, and it
must not disturb them (observers must not trigger exo elections, nor appear in exo's state).

exo starts an election round 0.2 s after any connection event and ends it 3 s later, so a
connection the observer caused shows up in the nodes' logs as a new round (check_logs
counts them) within a few seconds of the observer joining or leaving.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from .common import REPO_ROOT, short, since, wait_for
from .procs import ExoNode

QUIET = 4.0  # no election round on any node for this long: the cluster is settled
SETTLE_BOUND = 60.0  # the most we wait for that
WATCH = 6.0  # after the observer left, the most we wait for a round it caused (0.2 + 3 s)
HEALTH_ATTEMPTS = 2  # a snapshot can miss views while the observer is still joining


def p2pr_command(python: str) -> list[str]:
    """This project's `p2pr` command: its own .venv's when there is one, else through
    exo's Python (with the anyio compatibility shim)."""
    own = REPO_ROOT / ".venv" / "bin" / "p2pr"
    if own.exists():
        return [str(own)]
    code = "import sys, exo_swap; from p2pr.cli import main; sys.exit(main())"
    return [python, "-c", code]


def run_p2pr_health(node: ExoNode, p2pr: Sequence[str], *, as_json: bool = True) -> Any:
    """`p2pr health --once` against one exo node: the JSON (or the table's text)."""
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
        return out.stdout.strip()
    for line in reversed(out.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    return {"error": f"exit {out.returncode}: {out.stderr.strip()[-500:]}"}


def health_links(nodes: Sequence[ExoNode], p2pr: Sequence[str]) -> dict[str, Any]:
    """For a report of a disagreement: each exo node's view of the others' links (`p2pr
    health` through the first node that runs), so that a missing connection and a lost
    message can be told apart."""
    names = {n.node_id: n.name for n in nodes}
    running = [n for n in nodes if n.alive and not n.stopped]
    if not running:
        return {}
    try:
        health = run_p2pr_health(running[0], p2pr)
    except subprocess.SubprocessError as exc:
        return {"error": str(exc)}
    views = {
        names[node_id]: {
            names[p["peer"]]: p.get("state") for p in view.get("peers", []) if p["peer"] in names
        }
        for node_id, view in health.get("nodes", {}).items()
        if node_id in names
    }
    return {"via": running[0].name, "views": views, "error": health.get("error")}


def election_marks(nodes: Sequence[ExoNode]) -> tuple[tuple[str, int, int, str | None], ...]:
    """(node, election rounds, election results, master) for every node."""
    marks = []
    for node in nodes:
        scan = node.scan()
        marks.append((node.name, scan.campaigns, scan.results, scan.master))
    return tuple(marks)


def _foreign_in_state(nodes: Sequence[ExoNode], worker: bool) -> dict[str, list[str]]:
    """Node ids in an exo API state that are none of the exo nodes."""
    if not worker:
        return {}
    ids = {n.node_id for n in nodes}
    foreign = {}
    for node in nodes:
        listed = node.state_nodes() or frozenset()
        if listed - ids:
            foreign[node.name] = sorted(short(i) for i in listed - ids)
    return foreign


def watch_observer(nodes: Sequence[ExoNode], p2pr: Sequence[str], worker: bool) -> dict[str, Any]:
    """Run the observer against a settled cluster; what it saw and what it changed."""
    report: dict[str, Any] = {}
    _, settled = wait_for(lambda: election_marks(nodes), SETTLE_BOUND, stable=QUIET)
    if settled is None:
        report["not_settled"] = f"election rounds went on for {SETTLE_BOUND:.0f} s"
    before = election_marks(nodes)
    started = time.monotonic()
    ids = {n.node_id: n.name for n in nodes}
    health: dict[str, Any] = {}
    attempts = 0
    while attempts < HEALTH_ATTEMPTS:
        attempts += 1
        health = run_p2pr_health(nodes[0], p2pr)
        if set(ids) <= set(health.get("nodes", {})):
            break
    left = time.monotonic()
    # Wait for the round the observer would have caused; bounded by WATCH.
    wait_for(lambda: election_marks(nodes) != before or _foreign_in_state(nodes, worker), WATCH)
    after = election_marks(nodes)
    if after != before:
        # Count every round it caused: wait (bounded) until the nodes are quiet again.
        _, quiet = wait_for(lambda: election_marks(nodes), SETTLE_BOUND, stable=QUIET)
        report["quiet_again_s"] = since(left, quiet)
        after = election_marks(nodes)
    shown = set(health.get("nodes", {}))
    rounds = {}
    for (name, c0, r0, m0), (_, c1, r1, m1) in zip(before, after):
        if (c0, r0, m0) != (c1, r1, m1):
            rounds[name] = {
                "rounds": c1 - c0,
                "results": r1 - r0,
                "master": f"{ids.get(m0 or '', short(m0))} -> {ids.get(m1 or '', short(m1))}",
            }
    report.update(
        health_nodes=sorted(ids[i] for i in shown if i in ids),
        missing=sorted(name for i, name in ids.items() if i not in shown),
        other_views=len(shown - set(ids)),
        health_error=health.get("error"),
        attempts=attempts,
        observer_s=round(left - started, 2),
        disturbed="; ".join(
            f"{name}: {r['rounds']} election round(s), {r['results']} result(s), "
            f"master {r['master']}"
            for name, r in rounds.items()
        ),
        rounds=rounds,
        in_state=_foreign_in_state(nodes, worker),
    )
    return report
