"""Starting and stopping a local pipeline: N stage node processes on 127.0.0.1.

    with StageCluster(model_dir, nodes=2) as cluster:    # starts, waits until all are ready
        addrs = cluster.addrs                            # for PipelineClient.connect

Layers are split with `placement.place_layers` (equal memory: equal shares). Every process
gets `blas.node_environment()` (OpenBLAS preloaded, one BLAS thread), the condition for
bit-identical results on every node. All processes start at once (imports take seconds);
each gets its bootstrap addresses, those of every node before it, on standard input, so the
nodes form a full mesh. A node that fails to start raises `ClusterStartError` naming it, its
layers and why.

Kept clusters (`p2pr pipeline up`, `p2pr generate --keep`) run detached, until SIGTERM; their
process ids and addresses are recorded under the cache folder so that later commands join
them (`running_cluster`), `p2pr pipeline down` stops them (`stop_cluster`) and `p2pr health`
finds them (`kept_cluster_addrs`). The record follows the pipeline: a node that died is left
out of what `running_cluster` gives while any other still runs (the client joining the
survivors re-plans over them), and a client that used the kept pipeline writes back the plan
it left it in (`record_plan`: after a failover, the nodes that serve and their layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from inference_glue.blas import node_environment
from inference_glue.builtin_model import default_cache_dir
from inference_glue.placement import NodeMemory, place_layers
from router.faults import FAULTS_ENV

__all__ = [
    "ClusterStartError",
    "NodeHandle",
    "StageCluster",
    "cluster_state_path",
    "kept_cluster_addrs",
    "model_num_layers",
    "record_plan",
    "running_cluster",
    "split_layers",
    "stop_cluster",
]

STDERR_TAIL = 200


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
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None] = attrs.Factory(queue.Queue)
    stderr_tail: list[str] = attrs.Factory(list)
    node_id: str = ""
    addrs: list[str] = attrs.Factory(list)
    ready: dict[str, Any] = attrs.Factory(dict)
    log_path: Path | None = None

    @property
    def label(self) -> str:
        """'node 1 (stage 1, layers 15-29)'."""
        return (
            f"node {self.index} (stage {self.index}, layers "
            f"{self.layers.start}-{self.layers.stop - 1})"
        )

    def stderr_text(self, lines: int = 30) -> str:
        """The last lines the node wrote to its standard error."""
        if self.log_path is not None and self.log_path.exists():
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        return "".join(self.stderr_tail[-lines:])


class StageCluster:
    """N stage node processes serving one model, split into contiguous layer ranges.

    Args:
        model_dir: the mlx-lm model directory every node loads its part of.
        nodes: how many stages (processes).
        layers: explicit ranges, one per node (default: `split_layers`).
        faults: fault shim settings for every node (`P2PR_FAULTS`), e.g. "corrupt=0.05".
        compute: the nodes' `--compute` mode.
        detach: the nodes outlive this object (run until SIGTERM) and log to `log_dir`.
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
        compute: str = "inline",
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
                if node.proc.stdin is not None:
                    node.proc.stdin.close()
        return self

    def _spawn(self, index: int, layers: range, env: dict[str, str]) -> NodeHandle:
        args = [
            sys.executable,
            "-m",
            "inference_glue.node",
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
        log_path = None
        stderr: Any = subprocess.PIPE
        if self.detach:
            args.append("--detach")
            log_dir = self.log_dir or default_cache_dir() / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"node-{index}-{int(time.time())}.log"
            stderr = open(log_path, "w")  # the child keeps it open; ours is closed below
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                start_new_session=self.detach,
            )
        finally:
            if self.detach:
                stderr.close()
        node = NodeHandle(index, layers, proc, log_path=log_path)
        assert proc.stdout is not None
        threading.Thread(target=_lines, args=(proc.stdout, node.lines), daemon=True).start()
        if proc.stderr is not None:
            threading.Thread(
                target=_tail, args=(proc.stderr, node.stderr_tail), daemon=True
            ).start()
        return node

    def _introduce(self, node: NodeHandle, bootstrap: list[str], deadline: float) -> None:
        """Hand a spawned node its bootstrap addresses; wait until it listens."""
        assert node.proc.stdin is not None
        node.proc.stdin.write(json.dumps({"bootstrap": bootstrap}) + "\n")
        node.proc.stdin.flush()
        event = self._expect(node, "listening", deadline)
        node.node_id, node.addrs = event["node_id"], event["addrs"]

    def _expect(self, node: NodeHandle, event: str, deadline: float) -> dict[str, Any]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterStartError(
                    f"{node.label} was not {event} in time; its stderr ends with:\n"
                    f"{node.stderr_text()}"
                )
            try:
                line = node.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = node.proc.wait()
                raise ClusterStartError(
                    f"{node.label} exited with status {code} before it was {event}; "
                    f"its stderr ends with:\n{node.stderr_text()}"
                )
            try:
                data: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue  # not one of ours (a library printing to stdout)
            if data.get("event") == "error":
                raise ClusterStartError(f"{node.label} failed to start: {data.get('message')}")
            if data.get("event") == event:
                return data

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
        self.nodes[index].proc.send_signal(signal.SIGSTOP)
        return time.perf_counter()

    def resume(self, index: int) -> float:
        """SIGCONT node `index` after `hang`: the same process, peer id and state carry on
        (a GC stall or a laptop lid that opened again); returns the `time.perf_counter()`."""
        self.nodes[index].proc.send_signal(signal.SIGCONT)
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
        if old.proc.poll() is None:
            raise RuntimeError(f"{old.label} is still running")
        node = self._spawn(index, old.layers, self.environment())
        bootstrap = [
            a
            for other in self.nodes
            if other is not old
            and other.proc.poll() is None
            and (bootstrap_from is None or other.index in bootstrap_from)
            for a in other.addrs[:1]
        ] + list(extra_bootstrap)
        deadline = time.monotonic() + timeout
        self._introduce(node, bootstrap, deadline)
        node.ready = self._expect(node, "ready", deadline)
        self.nodes[index] = node
        return node

    def failed_nodes(self) -> list[str]:
        """Labels and exit statuses of nodes that are no longer running."""
        return [
            f"{node.label} exited with status {node.proc.returncode}"
            for node in self.nodes
            if node.proc.poll() is not None
        ]

    def close(self, timeout: float = 15.0) -> None:
        """Stop every node (not detached ones that started): close stdin, wait, kill."""
        if self.detach and all(n.ready for n in self.nodes):
            return
        for node in self.nodes:
            with contextlib.suppress(OSError):
                if node.proc.stdin is not None and not node.proc.stdin.closed:
                    node.proc.stdin.close()
            if self.detach:
                with contextlib.suppress(OSError):
                    node.proc.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def state(self) -> dict[str, Any]:
        """What `running_cluster` needs to find and join this cluster."""
        return {
            "model": str(self.model_dir.resolve()),
            "nodes": self.num_nodes,
            "pids": [n.proc.pid for n in self.nodes],
            "node_ids": [n.node_id for n in self.nodes],
            "addrs": self.addrs,
            "layers": [[n.layers.start, n.layers.stop] for n in self.nodes],
            "logs": [str(n.log_path) if n.log_path else None for n in self.nodes],
            "started": time.time(),
        }

    def __enter__(self) -> StageCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lines(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            sink.put(line)
    except (OSError, ValueError):
        pass
    finally:
        sink.put(None)


def _tail(stream: IO[str], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        del sink[:-STDERR_TAIL]


# -- kept clusters -------------------------------------------------------------------------


def cluster_state_path(model_dir: str | Path, nodes: int, cache_dir: Path | None = None) -> Path:
    """Where a kept cluster of `nodes` nodes serving `model_dir` is recorded."""
    model = str(Path(model_dir).resolve())
    key = hashlib.sha256(model.encode()).hexdigest()[:12]
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / "clusters" / f"{Path(model).name}-{key}-{nodes}.json"


# The per-node lists of a record, in stage order.
_NODE_FIELDS = ("pids", "node_ids", "addrs", "layers", "logs")


def _alive(pid: int) -> bool:
    """Whether `pid` runs a stage node (not a process that got the number of one that died)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc here: the signal test is all there is
    return b"inference_glue.node" in command


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("pids"), list) else None


def _live_nodes(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with only the nodes whose process still runs."""
    live = [i for i, pid in enumerate(state["pids"]) if _alive(int(pid))]
    out = dict(state)
    for field in _NODE_FIELDS:
        values = state.get(field) or [None] * len(state["pids"])
        out[field] = [values[i] for i in live if i < len(values)]
    return out


def running_cluster(
    model_dir: str | Path, nodes: int, cache_dir: Path | None = None
) -> dict[str, Any] | None:
    """The record of the kept cluster started with `nodes` nodes for this model, with only
    its nodes that still run (after a failover, the survivors); None (and the record
    removed) when none does."""
    path = cluster_state_path(model_dir, nodes, cache_dir)
    state = _read_record(path)
    if state is None:
        return None
    live = _live_nodes(state)
    if live["pids"] and live["addrs"]:
        return live
    stop_cluster(path)
    return None


def record_plan(path: Path, plan: Sequence[dict[str, Any]]) -> None:
    """Write back the plan a client left a kept cluster in: one dict per stage, in order,
    with `node_id`, `pid`, `layers` ([start, stop]) and `addrs` (where it listens; may be
    empty for a node the record already knows). Recorded nodes that still run but are not
    in the plan stay in the record (as spares, layers None), so that `pipeline down` stops
    them too."""
    state = _read_record(path)
    if state is None or not plan:
        return
    live = _live_nodes(state)
    known = {node: i for i, node in enumerate(live["node_ids"])}
    rows: list[tuple[Any, ...]] = []
    for stage in plan:
        i = known.pop(stage["node_id"], None)
        addrs = [a for a in stage.get("addrs", ()) if isinstance(a, str)]
        addr = live["addrs"][i] if i is not None else (addrs[0] if addrs else None)
        if addr is None:
            continue  # a node nobody could join again: not worth recording
        log = live["logs"][i] if i is not None else None
        rows.append((stage["pid"], stage["node_id"], addr, list(stage["layers"]), log))
    rows += [
        (live["pids"][i], node, live["addrs"][i], None, live["logs"][i])
        for node, i in known.items()
    ]
    if not rows:
        return
    for field, values in zip(_NODE_FIELDS, zip(*rows, strict=True), strict=True):
        state[field] = list(values)
    state["updated"] = time.time()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def save_cluster(cluster: StageCluster, cache_dir: Path | None = None) -> Path:
    """Record a started, detached cluster for later commands."""
    path = cluster_state_path(cluster.model_dir, cluster.num_nodes, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cluster.state(), indent=2) + "\n")
    return path


def stop_cluster(path: Path, timeout: float = 15.0) -> list[int]:
    """Stop the processes of a recorded cluster (SIGTERM, then SIGKILL); remove the record.

    Returns the process ids that were still running.
    """
    state = _read_record(path) or {}
    pids = [int(pid) for pid in state.get("pids", []) if _alive(int(pid))]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return pids


def recorded_clusters(cache_dir: Path | None = None) -> list[Path]:
    """Every recorded cluster file."""
    root = (cache_dir if cache_dir is not None else default_cache_dir()) / "clusters"
    return sorted(root.glob("*.json")) if root.is_dir() else []


def kept_cluster_addrs(cache_dir: Path | None = None) -> list[str]:
    """The node addresses of every kept cluster that still runs (for `p2pr health`)."""
    addrs: list[str] = []
    for path in recorded_clusters(cache_dir):
        try:
            record = json.loads(path.read_text())
            state = running_cluster(record["model"], record["nodes"], cache_dir)
        except (OSError, KeyError, json.JSONDecodeError):
            continue
        if state is not None:
            addrs += state["addrs"]
    return addrs
