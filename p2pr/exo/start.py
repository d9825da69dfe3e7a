"""One fresh start of a live 3-node exo cluster on our router, and its fault scenario.

A start: three `python -m exo` (own HOME, API port, listen port) found by one discovery mode
(`p2p`: bootstrap addresses with `/p2p/<id>`; `no-p2p`: bootstrap addresses without it, as
exo's own networking accepted; `mdns`: no bootstrap, mDNS in a private network namespace),
optionally with one CPU burner per core running. It must agree on one master with all three
nodes in every node's API state; then a `p2pr health` observer must see the three nodes and
disturb no election; then one scenario:
- `kill`: SIGKILL the master -> the survivors agree on a new master, states list them;
- `stop`: SIGSTOP the master -> the survivors agree on a new master; SIGCONT -> all three
  agree on one master again, with all three in every state;
- `restart`: SIGKILL a follower, start it again with the same HOME -> it has the same node id
  and the three agree again.
Every wait is bounded; a failure is recorded with its kind and what each node thought.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from .common import Deadline, since, wait_for
from .logs import merge_evidence
from .observer import health_links, watch_observer
from .procs import (
    ExoNode,
    NetnsUnavailable,
    burners,
    free_ports,
    make_identity,
    private_network,
    stop_groups,
)
from .views import Snapshot, SplitWatch

SCENARIOS = ("kill", "stop", "restart")
MODES = ("p2p", "no-p2p", "mdns")
SIZE = 3


@attrs.frozen
class Bounds:
    """Upper bounds of the waits (seconds); none of them is a pause."""

    api: float = 120.0  # every exo API answers
    agree: float = 90.0  # one master, every state complete
    stable: float = 4.0  # an agreement counts once it held this long
    reelect: float = 90.0  # survivors agree on a new master
    reconverge: float = 120.0  # after SIGCONT / a restart


@attrs.frozen
class StartPlan:
    index: int
    scenario: str
    mode: str
    burn: bool


@attrs.frozen
class ClusterSetup:
    """What every start of one run shares."""

    copy: Path  # exo with the adapter applied
    work: Path
    python: str  # exo's Python
    p2pr: list[str]
    worker: bool
    deadline: Deadline
    log: Callable[[str], None]
    bounds: Bounds = Bounds()


class StartFailed(Exception):
    """A failure after which this start cannot go on."""


class StartRun:
    """One start: boot, agree, observer, scenario; `run()` returns its JSON report."""

    def __init__(self, plan: StartPlan, setup: ClusterSetup) -> None:
        self.plan, self.setup, self.bounds = plan, setup, setup.bounds
        self.work = setup.work / f"start-{plan.index + 1:02d}"
        self.t0 = time.monotonic()
        self.nodes: list[ExoNode] = []
        self.down: set[str] = set()  # nodes we killed on purpose
        self.times: dict[str, float | None] = {}
        self.failures: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.splits = SplitWatch(self.t0)
        self.last: Snapshot | None = None

    # -- the start ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            with contextlib.ExitStack() as stack:
                if self.plan.burn:
                    life = min(1800.0, self.setup.deadline.remaining() + 60)
                    stack.enter_context(burners(os.cpu_count() or 1, life))
                if self.plan.mode == "mdns":
                    stack.enter_context(private_network())
                stack.callback(self._stop_all)
                self._boot()
                _, agreed = self._agree("start", self.nodes, self.bounds.agree, with_state=True)
                self.times["agree_s"] = since(self.t0, agreed)
                self.splits.armed = True
                self._observe()
                getattr(self, f"_scenario_{self.plan.scenario}")()
        except StartFailed:
            pass
        except NetnsUnavailable as exc:
            self._fail("mdns_unavailable", str(exc))
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            self._fail("harness_error", f"{type(exc).__name__}: {exc}")
        self._judge_logs()
        return self._report()

    def _judge_logs(self) -> None:
        """Log evidence that fails a start however it went: a lost election message (exo
        publishes one right after a connection event; join semantics must deliver it) and a
        node reported as a duplicate of itself (one node, one identity)."""
        for node in self.nodes:
            for scan in node.scans():
                lost = {k: v for k, v in scan.gaps.items() if k.startswith("election_messages")}
                for key, occ in lost.items():
                    self._fail(
                        "election_gap",
                        f"{node.name}: {occ.count} Gap(s) on {key}",
                        first_at=occ.first_at,
                        sample=occ.samples[0],
                    )
                dup = scan.duplicate_identity
                if dup.count:
                    self._fail(
                        "duplicate_identity",
                        f"{node.name}: {dup.count} report(s) of another live node using its "
                        f"identity, {dup.first_at} to {dup.last_at}",
                        sample=dup.samples[0],
                    )

    def _report(self) -> dict[str, Any]:
        now = time.monotonic()
        scans = {n.name: n.scans() for n in self.nodes}
        return {
            "index": self.plan.index + 1,
            "scenario": self.plan.scenario,
            "mode": self.plan.mode,
            "burn": self.plan.burn,
            "ok": not self.failures,
            "failures": self.failures,
            "times": self.times,
            **self.extra,
            "splits": self.splits.report(now),
            "nodes": [
                {
                    "name": n.name,
                    "node_id": n.node_id,
                    "api_port": n.api_port,
                    "libp2p_port": n.libp2p_port,
                    "evidence": merge_evidence(scans[n.name]),
                }
                for n in self.nodes
            ],
            "evidence": merge_evidence([s for found in scans.values() for s in found]),
            "seconds": round(now - self.t0, 1),
            "work": str(self.work),
        }

    def _boot(self) -> None:
        ports = free_ports(2 * SIZE)
        for i in range(SIZE):
            home = self.work / f"node{i + 1}"
            self.nodes.append(
                ExoNode(i + 1, make_identity(home), home, ports[2 * i], ports[2 * i + 1], self.work)
            )
        for node in self.nodes:
            self._start(node)
        at = self._wait(
            "api", lambda: all(n.api_node_id() == n.node_id for n in self.nodes), self.bounds.api
        )
        self.times["api_s"] = since(self.t0, at)

    def _start(self, node: ExoNode) -> None:
        env = {"EXO_P2PR_LISTEN_HOST": "127.0.0.1", "EXO_P2PR_MDNS": "0"}
        args: list[str] = [] if self.setup.worker else ["--no-worker"]
        others = [n for n in self.nodes if n is not node]
        if self.plan.mode == "p2p":
            args += ["--bootstrap-peers", ",".join(n.multiaddr for n in others)]
        elif self.plan.mode == "no-p2p":
            args += ["--bootstrap-peers", ",".join(n.bare_addr for n in others)]
        else:
            env["EXO_P2PR_MDNS"] = "1"
        node.start(self.setup.copy, self.setup.python, args, env)

    def _stop_all(self) -> None:
        stop_groups([n.proc for n in self.nodes])

    # -- waits -------------------------------------------------------------------------

    def _fail(self, kind: str, detail: Any, **more: Any) -> None:
        self.failures.append({"kind": kind, "detail": detail, **more})
        self.setup.log(f"  start {self.plan.index + 1}: {kind}: {detail}")

    def _check_crashes(self) -> None:
        for node in self.nodes:
            if node.name not in self.down and not node.alive:
                scan = node.scan()
                raised = [occ.samples[0] for occ in scan.exceptions.values()]
                self._fail(
                    "crash",
                    f"{node.name} exited with code {node.exit_code}"
                    + (f" ({raised[0]})" if raised else ""),
                    exceptions=raised,
                    log_tail=node.logs[-1].tail(),
                )
                raise StartFailed

    def _wait(self, phase: str, condition: Callable[[], Any], bound: float) -> float:
        def checked() -> Any:
            self._check_crashes()
            return condition()

        value, at = wait_for(checked, self.setup.deadline.bound(bound))
        if not value:
            self._fail(f"{phase}_timeout", f"not within {bound:.0f} s")
            raise StartFailed
        assert at is not None
        return at

    def _agree(
        self,
        phase: str,
        members: Sequence[ExoNode],
        bound: float,
        *,
        with_state: bool,
        links: bool = True,
    ) -> tuple[str, float]:
        """Wait until `members` agree (see Snapshot.agreed); a failure names its kind and,
        with `links`, each node's view of its links (read by an observer, which may itself
        start an election: not before a phase that must start from the failed state)."""
        expected = frozenset(n.node_id for n in members)

        def agreed() -> str | None:
            self._check_crashes()
            self.last = Snapshot.take(members, self.nodes, self.setup.worker)
            self.splits.observe(self.last, time.monotonic(), phase)
            return self.last.agreed(expected, with_state=with_state)

        master, at = wait_for(agreed, self.setup.deadline.bound(bound), stable=self.bounds.stable)
        if master is None or at is None:
            assert self.last is not None
            now = time.monotonic()
            self._fail(
                self.last.classify(expected),
                f"{phase}: no agreement within {bound:.0f} s: {self.last.describe()}",
                phase=phase,
                **self.last.details(expected),
                split=self.splits.ongoing(now),
                links=health_links(self.nodes, self.setup.p2pr) if links else "not read",
            )
            raise StartFailed
        self.splits.close(at)
        return master, at

    def _node(self, node_id: str) -> ExoNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    # -- observer ----------------------------------------------------------------------

    def _observe(self) -> None:
        """`p2pr health` while the cluster is settled: it must see the three nodes and
        disturb no election (see check_observer)."""
        report = watch_observer(self.nodes, self.setup.p2pr, self.setup.worker)
        self.extra["observer"] = report
        if report.get("not_settled"):
            self._fail("not_settled", report["not_settled"])
        if report["missing"]:
            self._fail("observer_missing_nodes", f"p2pr health lacks {report['missing']}")
        if report["disturbed"]:
            self._fail("observer_disturbed", report["disturbed"])
        if report["in_state"]:
            self._fail("observer_in_state", report["in_state"])
        if report["disturbed"] or report["in_state"]:
            # The scenario starts from an agreed cluster, whatever the observer did.
            self._agree("after observer", self.nodes, self.bounds.agree, with_state=True)

    # -- scenarios ---------------------------------------------------------------------

    def _master(self) -> ExoNode:
        assert self.last is not None
        master = self.last.master(frozenset(n.node_id for n in self.nodes))
        assert master is not None
        return self._node(master)

    def _scenario_kill(self) -> None:
        victim = self._master()
        survivors = [n for n in self.nodes if n is not victim]
        killed = time.monotonic()
        victim.kill()
        self.down.add(victim.name)
        self.extra["victim"] = victim.name
        self.setup.log(f"  SIGKILL master {victim.name}")
        _, at = self._agree("kill", survivors, self.bounds.reelect, with_state=False)
        self.times["kill_new_master_s"] = since(killed, at)
        if self.setup.worker:
            _, at = self._agree("kill state", survivors, self.bounds.reelect, with_state=True)
            self.times["kill_state_s"] = since(killed, at)

    def _scenario_stop(self) -> None:
        victim = self._master()
        survivors = [n for n in self.nodes if n is not victim]
        rounds = {n.name: n.scan().campaigns for n in survivors}
        stopped = time.monotonic()
        victim.signal(signal.SIGSTOP)
        self.extra["victim"] = victim.name
        self.setup.log(f"  SIGSTOP master {victim.name}")
        try:
            _, at = self._agree(
                "stop", survivors, self.bounds.reelect, with_state=False, links=False
            )
            self.times["stop_new_master_s"] = since(stopped, at)
            assert self.last is not None
            self.extra["survivor_state_sizes"] = self.last.state_sizes()
        except StartFailed:
            pass  # recorded; SIGCONT and reconvergence are checked all the same
        self.times["stopped_s"] = since(stopped, time.monotonic())
        # None at all: no connection event reached exo about the hung master.
        self.extra["rounds_while_stopped"] = {
            n.name: n.scan().campaigns - rounds[n.name] for n in survivors
        }
        resumed = time.monotonic()
        victim.signal(signal.SIGCONT)
        self.setup.log(f"  SIGCONT {victim.name}")
        _, at = self._agree("resume", self.nodes, self.bounds.reconverge, with_state=True)
        # Reconvergence is from two sides only where the survivors had moved on; else the
        # survivors still followed the resumed master and "agreement" needed nothing.
        moved_on = self.times.get("stop_new_master_s") is not None
        self.times["reconverge_s" if moved_on else "resume_unmoved_s"] = since(resumed, at)

    def _scenario_restart(self) -> None:
        master = self._master()
        victim = next(n for n in self.nodes if n is not master)
        victim.kill()
        self.extra["victim"] = victim.name
        self.setup.log(f"  SIGKILL {victim.name}, start it again with the same HOME")
        restarted = time.monotonic()
        self._start(victim)
        _, at = self._agree("rejoin", self.nodes, self.bounds.reconverge, with_state=True)
        self.times["rejoin_s"] = since(restarted, at)
        served, logged = victim.api_node_id(), victim.scan().logged_node_id
        self.extra["rejoined_id"] = {"api": served, "log": logged, "before": victim.node_id}
        if served != victim.node_id or logged != victim.node_id:
            self._fail("id_changed", f"{victim.name} came back as api={served} log={logged}")


def run_start(plan: StartPlan, setup: ClusterSetup) -> dict[str, Any]:
    setup.log(
        f"start {plan.index + 1}: {plan.scenario}, discovery {plan.mode}"
        + (", CPU burners" if plan.burn else "")
    )
    return StartRun(plan, setup).run()
