"""Several benchmark node processes on 127.0.0.1 (`p2pr.bench.loadtest` or
`p2pr.bench.rawgossip`), each bootstrapping from every node started before it (a full mesh),
and their results.

Each node prints its ready event, runs its experiment, prints its result event and keeps
serving its peers (acks, repairs) until its standard input closes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs

from ..launch import Launched, LaunchError, python_module, stop_all

__all__ = ["LOADTEST", "RAWGOSSIP", "LocalCluster", "NodeProcess"]

LOADTEST = "p2pr.bench.loadtest"
RAWGOSSIP = "p2pr.bench.rawgossip"


@attrs.define
class NodeProcess:
    """One node process, its ready event and (once it reported) its result."""

    process: Launched
    ready: dict[str, Any]
    result: dict[str, Any] | None = None


class LocalCluster:
    """Benchmark node processes of one `module` that form a full mesh."""

    def __init__(self, extra_env: dict[str, str] | None = None, module: str = LOADTEST) -> None:
        self.module = module
        self.nodes: list[NodeProcess] = []
        self.env = {**os.environ, **(extra_env or {})}

    def start(self, args: Sequence[str], timeout: float = 60.0) -> NodeProcess:
        """Start a node with `args` (its flags) and wait for its ready event."""
        bootstrap = [f"--bootstrap={a}" for n in self.nodes for a in n.ready["addrs"][:1]]
        process = Launched(
            python_module(self.module, *bootstrap, *args),
            label=f"{self.module} node {len(self.nodes)}",
            env=self.env,
        )
        try:
            ready = process.expect("ready", timeout)
        except LaunchError as exc:
            process.stop(terminate=False)
            raise RuntimeError(str(exc)) from None
        node = NodeProcess(process, ready)
        self.nodes.append(node)
        return node

    def results(self, timeout: float = 300.0) -> list[dict[str, Any]]:
        """Wait for every node's result event; then let them all exit."""
        for node in self.nodes:
            try:
                node.result = node.process.expect("result", timeout)
            except LaunchError as exc:
                raise RuntimeError(str(exc)) from None
        return [n.result for n in self.nodes if n.result is not None]

    def close(self) -> None:
        """Close every node's standard input (their signal to leave) and reap them."""
        stop_all([n.process for n in self.nodes], terminate=False)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
