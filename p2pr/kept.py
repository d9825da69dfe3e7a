"""Kept pipelines: stage clusters that outlive the command that started them.

`p2pr pipeline up` and `p2pr generate --keep` start detached stage nodes (they run until
SIGTERM) and record their process ids and addresses under the cache folder, so that later
commands join them (`running_cluster`), `p2pr pipeline down` stops them (`stop_cluster`) and
`p2pr health` finds them (`kept_cluster_addrs`). The record follows the pipeline: a node that
died is left out of what `running_cluster` gives while any other still runs (the client
joining the survivors re-plans over them), and a client that used the kept pipeline writes
back the plan it left it in (`record_plan`: after a failover, the nodes that serve and their
layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference_glue.builtin_model import default_cache_dir

from .stage_cluster import STAGE_NODE_MODULE, StageCluster

__all__ = [
    "cluster_state_path",
    "kept_cluster_addrs",
    "record_plan",
    "recorded_clusters",
    "running_cluster",
    "save_cluster",
    "stop_cluster",
]


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
    return STAGE_NODE_MODULE.encode() in command


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
