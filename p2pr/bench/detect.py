"""`p2pr bench detect`: how long after a SIGKILL the other nodes call the victim dead."""

from __future__ import annotations

import signal
import time
from typing import Any

import anyio

from discovery.node import ClusterNode, NodeSettings

from ..launch import Launched, python_module, stop_all


def _start_node(*args: str) -> tuple[Launched, dict[str, Any]]:
    process = Launched(
        python_module("p2pr", "node", "--identity", "none", *args), label="p2pr node"
    )
    return process, process.expect("ready", 60)


async def _trial(nodes: int) -> dict[str, Any]:
    procs = []
    try:
        first, ready = _start_node()
        procs.append((first, ready))
        for _ in range(nodes - 1):
            procs.append(_start_node("--bootstrap", ready["addrs"][0]))
        observer = ClusterNode(NodeSettings(bootstrap=(ready["addrs"][0],), role="observer"))
        async with anyio.create_task_group() as tg:
            await tg.start(observer.run)
            victim_proc, victim = procs[-1]
            others = [r["node_id"] for _, r in procs[:-1]]

            def states() -> dict[str, str | None]:
                out: dict[str, str | None] = {}
                for view in observer.views.current():
                    for peer in view.peers:
                        if view.node_id in others and peer.peer == victim["node_id"]:
                            out[view.node_id] = peer.state
                return out

            with anyio.fail_after(30):
                while list(states().values()).count("ALIVE") < len(others):
                    await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # a settled heartbeat history, as in steady state
            killed = time.time()
            victim_proc.signal(signal.SIGKILL)
            detected: dict[str, float] = {}
            with anyio.fail_after(30):
                while len(detected) < len(others):
                    for view in observer.views.current():
                        for peer in view.peers:
                            if (
                                view.node_id in others
                                and view.node_id not in detected
                                and peer.peer == victim["node_id"]
                                and peer.state == "DEAD"
                            ):
                                # sent_at: the view left that node as soon as it saw the death.
                                detected[view.node_id] = view.sent_at - killed
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        return {"detect_s": sorted(detected.values())}
    finally:
        stop_all([process for process, _ in procs])


def bench_detect(trials: int = 3, nodes: int = 3) -> dict[str, Any]:
    """Kill one node of a fresh local cluster `trials` times; time until others see DEAD."""
    results = [anyio.run(_trial, nodes) for _ in range(trials)]
    times = [t for r in results for t in r["detect_s"]]
    return {
        "trials": trials,
        "nodes": nodes,
        "detect_s": [round(t, 3) for t in times],
        "max_s": round(max(times), 3),
        "mean_s": round(sum(times) / len(times), 3),
    }
