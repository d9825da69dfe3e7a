"""Starting and stopping a local pipeline: N stage node processes on 127.0.0.1.

    with StageCluster(model_dir, nodes=2) as cluster:    # starts, waits until all are ready
        addrs = cluster.addrs                            # for PipelineClient.connect

Layers are split with `placement.place_layers` (equal memory: equal shares). Every process
(`python -m p2pr.stage_node`) gets `blas.node_environment()` (OpenBLAS preloaded, one BLAS
thread), the condition for bit-identical results on every node. All processes start at once
(imports take seconds); each gets its bootstrap addresses, those of every node before it, on
standard input, so the nodes form a full mesh. A node that fails to start raises
`ClusterStartError` naming it, its layers and why. Kept (detached) clusters are recorded by
`p2pr.kept`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from inference_glue.blas import node_environment
from inference_glue.builtin_model import default_cache_dir
from inference_glue.placement import NodeMemory, place_layers
from router.faults import FAULTS_ENV

from .launch import Launched, LaunchError, python_module, stop_all

__all__ = [
    "STAGE_NODE_MODULE",
    "ClusterStartError",
    "NodeHandle",
    "StageCluster",
    "model_num_layers",
    "split_layers",
]

STAGE_NODE_MODULE = "p2pr.stage_node"
STAGE_LOG_LEVEL_ENV = "P2PR_STAGE_LOG_LEVEL"  # e.g. INFO: the nodes' --log-level
STAGE_LOG_DIR_ENV = "P2PR_STAGE_LOG_DIR"  # keep every node's standard error in a file there


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class ClusterStartError(RuntimeError):
    """A node process of the pipeline did not start; the message says which and why."""


def model_num_layers(model_dir: str | Path) -> int:
    """The number of transformer layers in an mlx-lm model directory's config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config["num_hidden_layers"])


def split_layers(num_layers: int, nodes: int) -> list[range]:
    """Contiguous layer ranges for `nodes` nodes of equal memory."""
    if nodes < 1:
        raise ValueError(f"need at least one node, got {nodes}")
    if nodes > num_layers:
        raise ValueError(f"{nodes} nodes for a model of {num_layers} layers")
    placement = place_layers(num_layers, [NodeMemory(f"node-{i}", 1.0) for i in range(nodes)])
    return [p.layers for p in placement]


@attrs.define
class NodeHandle:
    """One node process and what it said."""

    index: int
    layers: range
    process: Launched
    node_id: str = ""
    addrs: list[str] = attrs.Factory(list)
    ready: dict[str, Any] = attrs.Factory(dict)

    @property
    def label(self) -> str:
        """'node 1 (stage 1, layers 15-29)'."""
        return self.process.label

    @property
    def proc(self) -> Any:
        """The node's `subprocess.Popen`."""
        return self.process.proc

    @property
    def log_path(self) -> Path | None:
        """Where a detached node writes its standard error."""
        return self.process.log_path

    def stderr_text(self, lines: int = 30) -> str:
        """The last lines the node wrote to its standard error."""
        return self.process.stderr_text(lines)


class StageCluster:
    """N stage node processes serving one model, split into contiguous layer ranges.

    Args:
        model_dir: the mlx-lm model directory every node loads its part of.
        nodes: how many stages (processes).
        layers: explicit ranges, one per node (default: `split_layers`).
        faults: fault shim settings for every node (`P2PR_FAULTS`), e.g. "corrupt=0.05".
        compute: the nodes' `--compute` mode.
        detach: the nodes outlive this object (run until SIGTERM) and log to `log_dir`.
        log_dir: where the nodes write their standard error (default: `P2PR_STAGE_LOG_DIR`;
            for detached nodes the cache's logs/; else only a tail is kept in memory).
        extra_env: more environment variables for the nodes.
        memory_budget: every node's `--memory-budget` (e.g. "8M"; default: available memory).
        node_args: more command-line arguments for some nodes, by index (fault injection:
            `{1: ["--corrupt-activations=1"]}`).
        fault_control: the nodes obey `SetFaults` (chaos runs).
    """

    def __init__(
        self,
        model_dir: str | Path,
        nodes: int = 2,
        *,
        layers: Sequence[range] | None = None,
        faults: str | None = None,
        compute: str = "thread",
        detach: bool = False,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        model_name: str | None = None,
        memory_budget: str | None = None,
        node_args: dict[int, list[str]] | None = None,
        fault_control: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.layers = list(layers) if layers is not None else None
        self.num_nodes = nodes
        self.faults = faults
        self.compute = compute
        self.detach = detach
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.model_name = model_name
        self.memory_budget = memory_budget
        self.node_args = dict(node_args or {})
        self.fault_control = fault_control
        self.nodes: list[NodeHandle] = []

    @property
    def addrs(self) -> list[str]:
        """One multiaddr (with /p2p/<id>) per node, in stage order."""
        return [node.addrs[0] for node in self.nodes if node.addrs]

    def environment(self) -> dict[str, str]:
        """The node processes' environment."""
        env = node_environment()
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        if self.faults is not None:
            env[FAULTS_ENV] = self.faults
        return env

    def start(
        self, timeout: float = 180.0, progress: Callable[[str], None] | None = None
    ) -> StageCluster:
        """Start every node and wait until all have loaded their layers."""
        if self.nodes:
            raise RuntimeError("the cluster is already started")
        if not (self.model_dir / "config.json").is_file():
            raise ClusterStartError(f"{self.model_dir} is not an mlx-lm model directory")
        layers = self.layers or split_layers(model_num_layers(self.model_dir), self.num_nodes)
        if len(layers) != self.num_nodes:
            raise ValueError(f"{len(layers)} layer ranges for {self.num_nodes} nodes")
        deadline = time.monotonic() + timeout
        say = progress or (lambda _: None)
        say(f"starting {self.num_nodes} node processes for {self.model_dir.name}")
        try:
            env = self.environment()
            for index, part in enumerate(layers):
                self.nodes.append(self._spawn(index, part, env))
            for node in self.nodes:
                bootstrap = [a for earlier in self.nodes[: node.index] for a in earlier.addrs[:1]]
                self._introduce(node, bootstrap, deadline)
            for node in self.nodes:
                node.ready = self._expect(node, "ready", deadline)
                say(
                    f"{node.label} ready: {node.node_id[-8:]}, loaded in "
                    f"{node.ready['load_seconds']:.1f} s"
                )
        except BaseException:
            self.close()
            raise
        if self.detach:
            for node in self.nodes:
                # The nodes run on by themselves now (their stdout pipe closes when this
                # process exits; it is not closed here, where a reader thread may block on it).
                node.process.close_stdin()
        return self

    def _spawn(self, index: int, layers: range, env: dict[str, str]) -> NodeHandle:
        args = [
            f"--model={self.model_dir}",
            f"--layers={layers.start}:{layers.stop}",
            f"--stage={index}",
            f"--stages={self.num_nodes}",
            f"--compute={self.compute}",
            "--bootstrap-stdin",
        ]
        if self.model_name:
            args.append(f"--model-name={self.model_name}")
        if self.memory_budget:
            args.append(f"--memory-budget={self.memory_budget}")
        if self.fault_control:
            args.append("--allow-fault-control")
        args += self.node_args.get(index, [])
        if level := os.environ.get(STAGE_LOG_LEVEL_ENV):
            args.append(f"--log-level={level}")
        log_path = None
        log_dir = self.log_dir or _env_path(STAGE_LOG_DIR_ENV)
        if self.detach:
            args.append("--detach")
            log_dir = log_dir or default_cache_dir() / "logs"
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"node-{index}-{time.time_ns()}.log"
        label = f"node {index} (stage {index}, layers {layers.start}-{layers.stop - 1})"
        process = Launched(
            python_module(STAGE_NODE_MODULE, *args),
            label=label,
            env=env,
            log_path=log_path,
            new_session=self.detach,
        )
        return NodeHandle(index, layers, process)

    def _introduce(self, node: NodeHandle, bootstrap: list[str], deadline: float) -> None:
        """Hand a spawned node its bootstrap addresses; wait until it listens."""
        node.process.send({"bootstrap": bootstrap})
        event = self._expect(node, "listening", deadline)
        node.node_id, node.addrs = event["node_id"], event["addrs"]

    @staticmethod
    def _expect(node: NodeHandle, event: str, deadline: float) -> dict[str, Any]:
        try:
            return node.process.expect(event, deadline=deadline)
        except LaunchError as exc:
            raise ClusterStartError(str(exc)) from None

    def kill(self, index: int) -> float:
        """SIGKILL node `index` (no goodbye: its sockets just close); returns the
        `time.perf_counter()` of the kill."""
        node = self.nodes[index]
        node.proc.kill()
        at = time.perf_counter()
        node.proc.wait()
        return at

    def hang(self, index: int) -> float:
        """SIGSTOP node `index`: its connections stay open but it says nothing more (a hung
        node, found only by phi accrual); returns the `time.perf_counter()` of the stop.
        `kill` it afterwards."""
        self.nodes[index].process.signal(signal.SIGSTOP)
        return time.perf_counter()

    def resume(self, index: int) -> float:
        """SIGCONT node `index` after `hang`: the same process, peer id and state carry on
        (a GC stall or a laptop lid that opened again); returns the `time.perf_counter()`."""
        self.nodes[index].process.signal(signal.SIGCONT)
        return time.perf_counter()

    def restart(
        self,
        index: int,
        extra_bootstrap: Sequence[str] = (),
        timeout: float = 120.0,
        bootstrap_from: Sequence[int] | None = None,
    ) -> NodeHandle:
        """Start node `index` again (a new process and peer id, the same layers and
        arguments), bootstrapping from the other nodes that still run (only those of
        `bootstrap_from`, when given) and `extra_bootstrap`; waits until it is ready."""
        old = self.nodes[index]
        if old.process.running():
            raise RuntimeError(f"{old.label} is still running")
        node = self._spawn(index, old.layers, self.environment())
        bootstrap = [
            a
            for other in self.nodes
            if other is not old
            and other.process.running()
            and (bootstrap_from is None or other.index in bootstrap_from)
            for a in other.addrs[:1]
        ] + list(extra_bootstrap)
        deadline = time.monotonic() + timeout
        self._introduce(node, bootstrap, deadline)
        node.ready = self._expect(node, "ready", deadline)
        self.nodes[index] = node
        return node

    def close(self, timeout: float = 15.0) -> None:
        """Stop every node (not detached ones that started): close stdin (the signal of an
        attached node to leave; a detached one gets SIGTERM), wait, kill."""
        if self.detach and all(n.ready for n in self.nodes):
            return
        stop_all([n.process for n in self.nodes], timeout, terminate=self.detach)

    def state(self) -> dict[str, Any]:
        """What `p2pr.kept.running_cluster` needs to find and join this cluster."""
        return {
            "model": str(self.model_dir.resolve()),
            "nodes": self.num_nodes,
            "pids": [n.process.pid for n in self.nodes],
            "node_ids": [n.node_id for n in self.nodes],
            "addrs": self.addrs,
            "layers": [[n.layers.start, n.layers.stop] for n in self.nodes],
            "logs": [str(n.log_path) if n.log_path else None for n in self.nodes],
            "started": time.time(),
        }

    def __enter__(self) -> StageCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.close()
        if kind is not None and not self.detach:
            # A failed test shows what every node said last (pytest prints captured stderr).
            for node in self.nodes:
                print(f"--- {node.label} stderr ---\n{node.stderr_text(80)}", file=sys.stderr)
