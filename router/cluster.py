"""Starting several `router.loadtest` node processes on 127.0.0.1 and collecting results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

import attrs


@attrs.define
class NodeProcess:
    """One node process and the lines it printed."""

    proc: subprocess.Popen[str]
    ready: dict[str, Any] = attrs.Factory(dict)
    result: dict[str, Any] | None = None
    stderr_tail: list[str] = attrs.Factory(list)


class LocalCluster:
    """Node processes that bootstrap from every node started before them (a full mesh)."""

    def __init__(
        self, extra_env: dict[str, str] | None = None, module: str = "router.loadtest"
    ) -> None:
        self.module = module
        self.nodes: list[NodeProcess] = []
        self.env = {**os.environ, **(extra_env or {})}

    def start(self, args: Sequence[str], timeout: float = 60.0) -> NodeProcess:
        """Start a node with `args` (loadtest flags) and wait for its ready line."""
        bootstrap = [f"--bootstrap={a}" for n in self.nodes for a in n.ready["addrs"][:1]]
        proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *bootstrap, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        node = NodeProcess(proc)
        assert proc.stderr is not None
        threading.Thread(target=_tail, args=(proc.stderr, node.stderr_tail), daemon=True).start()
        node.ready = self._read_json(node, timeout)
        self.nodes.append(node)
        return node

    def results(self, timeout: float = 300.0) -> list[dict[str, Any]]:
        """Wait for every node's result line; then let them all exit."""
        for node in self.nodes:
            node.result = self._read_json(node, timeout)
        return [n.result for n in self.nodes if n.result is not None]

    def close(self) -> None:
        """Close every node's stdin (their signal to leave) and reap them."""
        for node in self.nodes:
            if node.proc.stdin and not node.proc.stdin.closed:
                node.proc.stdin.close()
        for node in self.nodes:
            try:
                node.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _read_json(node: NodeProcess, timeout: float) -> dict[str, Any]:
        assert node.proc.stdout is not None
        line_box: list[str] = []
        reader = threading.Thread(
            target=lambda: line_box.append(node.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not line_box or not line_box[0]:
            raise RuntimeError(
                f"node gave no output within {timeout}s; stderr: {''.join(node.stderr_tail[-20:])}"
            )
        data: dict[str, Any] = json.loads(line_box[0])
        return data


def _tail(stream: IO[str], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        del sink[:-200]
