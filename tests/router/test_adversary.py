"""A hostile peer against a live node and a live pipeline (issue 13's rows, replayed).

One `p2pr node` (with --metrics-port) stands through every attack of tests/router/attacker.py, each
from a fresh attacker identity. Throughout, a watcher asks its /health every 0.25 s; after
each attack the test checks that the node is still running, /health always answered within
1 s, its RSS never went more than RSS_BUDGET above the idle RSS, its CPU went back to idle
within 5 s of the attacker leaving, and the refusals are counted with the attacker's peer id
in /metrics. A 2-stage pipeline under attack keeps serving an honest generation that is
identical to single-device mlx-lm.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import P2prNode

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]
ATTACKER = str(Path(__file__).with_name("attacker.py"))
RSS_BUDGET = 64 * 1024 * 1024
IDLE_CPU = 0.25  # share of one core a node may use while idle (heartbeats, health views)
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Target:
    """A `p2pr node` and a watcher thread on its /health and its memory."""

    def __init__(self, log_path: Path) -> None:
        self.node = P2prNode("--identity", "none", "--metrics-port", "0", log_path=log_path)
        self.proc = self.node.proc
        self.node_id: str = self.node.node_id
        self.addr: str = self.node.addr
        self.metrics_port: int = self.node.ready["metrics_port"]
        self.worst_health = 0.0
        self.health_failures: list[str] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._get("/health", timeout=30)
        self.idle_rss = self._settled_rss()
        threading.Thread(target=self._watch, daemon=True).start()

    @property
    def stderr(self) -> list[str]:
        """Every line the node wrote to its standard error."""
        return self.node.process.stderr_text(lines=1_000_000).splitlines()

    def _get(self, path: str, timeout: float) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return str(answer.read().decode())

    def _settled_rss(self) -> int:
        samples = []
        for _ in range(10):
            samples.append(rss(self.proc.pid))
            time.sleep(0.1)
        return max(samples)

    def _watch(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            started = time.monotonic()
            try:
                self._get("/health", timeout=1.0)
            except Exception as exc:
                self.health_failures.append(repr(exc))
            self.worst_health = max(self.worst_health, time.monotonic() - started)
            self.peak_rss = max(self.peak_rss, rss(self.proc.pid))
            self._stop.wait(0.25)

    def begin(self) -> None:
        """Judge what follows on its own (the node may carry memory from an earlier row,
        but must not grow beyond the idle RSS + RSS_BUDGET during this one)."""
        self.health_failures.clear()
        self.worst_health = 0.0
        self.peak_rss = rss(self.proc.pid)

    def rejected(self, peer: str) -> dict[str, float]:
        """The refusals /metrics counts against `peer`, by kind."""
        out: dict[str, float] = {}
        pattern = re.compile(
            r'p2pr_rejected_total\{kind="([^"]+)",node="[^"]+",peer="([^"]+)"\} (\S+)'
        )
        for kind, who, value in pattern.findall(self._get("/metrics", timeout=5)):
            if who == peer:
                out[kind] = float(value)
        return out

    def back_to_idle(self, within: float = 5.0) -> float | None:
        """Seconds until a 1 s window of CPU use below IDLE_CPU, or None within `within`."""
        start = time.monotonic()
        while time.monotonic() - start < within:
            before = cpu_seconds(self.proc.pid)
            time.sleep(1.0)
            if cpu_seconds(self.proc.pid) - before < IDLE_CPU:
                return time.monotonic() - start
        return None

    def stop(self) -> None:
        self._stop.set()
        self.node.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    node = Target(tmp_path_factory.mktemp("target") / "stderr.log")
    yield node
    node.stop()


def attack(
    name: str, target: Target, count: int, victim: str = "", kinds: set[str] | None = None
) -> dict[str, Any]:
    target.begin()
    metrics = f"http://127.0.0.1:{target.metrics_port}/metrics" if kinds else ""
    out = subprocess.run(
        [sys.executable, ATTACKER, name, "--target", target.addr, "--count", str(count),
         "--victim", victim, "--metrics", metrics, "--kinds", ",".join(sorted(kinds or ()))],
        capture_output=True, text=True, timeout=240, cwd=REPO, check=False,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"attacker {name} printed nothing: {out.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def assert_stood(target: Target, name: str) -> None:
    assert target.proc.poll() is None, f"the node died under {name}: {''.join(target.stderr[-30:])}"
    assert not target.health_failures, (name, target.health_failures[:3])
    assert target.worst_health < 1.0, (name, target.worst_health)
    grown = target.peak_rss - target.idle_rss
    assert grown < RSS_BUDGET, f"{name}: RSS grew by {grown / 2**20:.0f} MiB"
    assert target.back_to_idle() is not None, f"{name}: CPU did not go back to idle within 5 s"


ROWS = [
    # (attack, count, kinds of refusal expected in /metrics for the attacker, or None)
    ("bad-views", 200, {"bad payload"}),
    ("garbage", 5000, {"malformed envelope"}),
    ("oversized", 20, {"oversized frame"}),
    ("bad-rpc", 20, {"malformed pubsub message"}),
    ("bad-protocols", 40, {"bad hello"}),
    ("idle-streams", 3000, {"too many direct streams", "too many streams"}),
    ("slow-loris", 200, {"too many direct streams", "too many unfinished bytes"}),
    ("over-credit", 6000, {"over credit"}),
    ("zstd-bomb", 6, {"decompressed size over credit"}),
    ("stream-names", 3000, {"too many direct streams"}),
]


@pytest.mark.parametrize(("name", "count", "kinds"), ROWS, ids=[r[0] for r in ROWS])
def test_a_node_stands_through(target: Target, name: str, count: int, kinds: set[str]) -> None:
    result = attack(name, target, count, kinds=kinds)
    assert_stood(target, name)
    counted = target.rejected(result["attacker"])
    assert kinds & set(counted), f"{name}: refusals counted for the attacker: {counted}"


def test_views_are_accepted_only_from_their_own_node(target: Target, tmp_path: Path) -> None:
    honest = Target(tmp_path / "honest.log")  # a second node, the one the attacker pretends to be
    try:
        result = attack("impersonate", target, 40, victim=honest.node_id)
        assert_stood(target, "impersonate")
        assert target.rejected(result["attacker"]).get("bad payload", 0) >= 1
        assert not any("MY identity" in line for line in target.stderr + honest.stderr)
    finally:
        honest.stop()


def test_addresses_from_a_view_are_dialed_once(target: Target) -> None:
    result = attack("addresses", target, 5)
    assert_stood(target, "addresses")
    assert max(result["dials_per_address"]) <= 1, result
    assert sum(result["dials_per_address"]) <= 10


def test_a_metrics_client_that_says_nothing_costs_nothing(target: Target) -> None:
    import socket

    target.begin()
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", target.metrics_port), timeout=5):
            pass
    with socket.create_connection(("127.0.0.1", target.metrics_port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert_stood(target, "metrics")
    assert "p2pr_peer_up" in target._get("/metrics", timeout=5)


def test_the_log_is_not_flooded(target: Target) -> None:
    # Every row above ran against this node: thousands of refusals, a few lines each kind.
    warnings = [line for line in target.stderr if "refused input" in line or "Rejected" in line]
    assert len(warnings) < 200, warnings[:20]


async def _generate_under_attack(cluster: Any, tiny_dir: Path, case: dict[str, Any]) -> Any:
    from inference_glue.client import PipelineClient

    async with PipelineClient.connect(cluster.addrs, tiny_dir) as client:
        return await client.generate(
            case["prompt_ids"], case["max_tokens"], temp=case["temp"], seed=case["seed"]
        )


def test_a_pipeline_under_attack_still_answers_exactly(tmp_path: Path) -> None:
    from inference_glue.client import load_tokenizer
    from inference_glue.local_pipeline import prompt_token_ids
    from inference_glue.tiny_model import build_tiny_model
    from p2pr.reference import run_reference
    from p2pr.stage_cluster import StageCluster

    tiny = build_tiny_model(tmp_path / "model", seed=5, num_layers=4)
    prompt = prompt_token_ids(load_tokenizer(tiny), "Under attack, say something")
    case = {"prompt_ids": prompt, "max_tokens": 32, "temp": 0.8, "seed": 3}
    expected = run_reference(tiny, [case])[0]
    with StageCluster(tiny, 2) as cluster:
        attackers = [
            subprocess.Popen(
                [sys.executable, ATTACKER, name, "--target", addr, "--count", str(count)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=REPO,
            )
            for addr in cluster.addrs
            for name, count in (("bad-views", 300), ("garbage", 3000))
        ]
        try:
            result = anyio.run(_generate_under_attack, cluster, tiny, case)
        finally:
            for proc in attackers:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
        assert all(node.proc.poll() is None for node in cluster.nodes)
    assert list(result.token_ids) == expected["token_ids"]
    assert result.text == expected["text"]
