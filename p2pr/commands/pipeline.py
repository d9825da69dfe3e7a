"""`p2pr pipeline up|down|status`: keep a local pipeline running between commands.

p2pr pipeline up [--nodes N] [--model DIR]      # detached stage nodes, recorded
p2pr pipeline status [--json]                   # the kept pipelines and their live nodes
p2pr pipeline down [--nodes N] [--model DIR] | --all
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..models import model_option, model_or_exit
from ..render import console, fail

__all__ = ["add_pipeline_command"]


def add_pipeline_command(sub: Any) -> None:
    """Register `p2pr pipeline`."""
    pipeline = sub.add_parser("pipeline", help="keep a local pipeline running for generate")
    pipeline.add_argument("action", choices=["up", "down", "status"])
    pipeline.add_argument("--nodes", type=int, default=2)
    model_option(pipeline)
    pipeline.add_argument("--all", action="store_true", help="down: every kept pipeline")
    pipeline.add_argument("--faults", default=None, help="up: fault shim (P2PR_FAULTS)")
    pipeline.add_argument("--json", action="store_true")
    pipeline.set_defaults(func=_cmd_pipeline)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _status(args)
    if args.action == "down":
        return _down(args)
    return _up(args)


def _status(args: argparse.Namespace) -> int:
    from ..kept import recorded_clusters, running_cluster

    rows = []
    for path in recorded_clusters():
        state = json.loads(path.read_text())
        # The nodes that still run (after a failover, the survivors serve).
        live = running_cluster(state["model"], state["nodes"])
        row = {**state, **(live or {}), "running": live is not None, "record": str(path)}
        rows.append({**row, "serving": len(live["pids"]) if live else 0})
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no kept pipelines")
    for row in rows:
        serving = f"{row['serving']} of {row['nodes']} nodes" if row["running"] else "gone"
        print(
            f"{Path(row['model']).name}: started with {row['nodes']} nodes, pids "
            f"{row['pids']}, {'running: ' + serving if row['running'] else serving}; "
            f"first node {row['addrs'][0] if row['addrs'] else '-'}"
        )
    return 0


def _down(args: argparse.Namespace) -> int:
    from ..kept import cluster_state_path, recorded_clusters, stop_cluster

    if args.all:
        paths = recorded_clusters()
    else:
        paths = [cluster_state_path(model_or_exit(args.model, "pipeline down"), args.nodes)]
    stopped = 0
    for path in paths:
        if path.exists():
            pids = stop_cluster(path)
            stopped += 1
            print(f"stopped {path.stem}: pids {pids}")
    if not stopped:
        print("no kept pipeline to stop")
    return 0


def _up(args: argparse.Namespace) -> int:
    from ..kept import running_cluster, save_cluster
    from ..stage_cluster import ClusterStartError, StageCluster

    model_dir = model_or_exit(args.model, "pipeline up")
    state = running_cluster(model_dir, args.nodes)
    if state is not None:
        print(f"already running: pids {state['pids']}; first node {state['addrs'][0]}")
        return 0
    cluster = StageCluster(model_dir, args.nodes, detach=True, faults=args.faults)
    err = console(stderr=True)
    try:
        cluster.start(progress=lambda line: err.print(f"[dim]{line}[/]"))
    except (ClusterStartError, ValueError) as exc:
        return fail("pipeline up", exc)
    path = save_cluster(cluster)
    print(f"pipeline of {args.nodes} nodes running (record: {path})")
    for node in cluster.nodes:
        print(f"  {node.label}: {node.addrs[0]}  log {node.log_path}")
    return 0
