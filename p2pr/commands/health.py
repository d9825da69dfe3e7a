"""`p2pr health`: every node's view of its peers, joined as an observer.

    p2pr health [--bootstrap MULTIADDR] [--once] [--json] [--wait S] [--all]

A live table (or, with `--json`, one JSON document per line as views change); `--once` waits
up to `--wait` seconds for the nodes' views, prints one snapshot, and exits 1 if none came.
Without `--bootstrap`, `--peers-file` or `--mdns` it joins the pipelines kept by
`p2pr pipeline up`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import anyio
import attrs
from rich.console import Console
from rich.live import Live
from rich.table import Table

from discovery.node import ClusterNode
from discovery.peers import PeerAddressError

from .node import discovery_args, discovery_settings

__all__ = ["add_health_command"]


def add_health_command(sub: Any) -> None:
    """Register `p2pr health`."""
    health = sub.add_parser("health", help="live table of every peer's health in the cluster")
    discovery_args(health)
    health.add_argument("--once", action="store_true", help="print one snapshot and exit")
    health.add_argument("--json", action="store_true", help="machine-readable output")
    health.add_argument("--wait", type=float, default=4.0, help="--once: seconds to gather views")
    health.add_argument("--all", action="store_true", help="include observers (CLI sessions)")
    health.set_defaults(func=_cmd_health)


def _cmd_health(args: argparse.Namespace) -> int:
    try:
        settings = discovery_settings(args, "observer")
    except (PeerAddressError, ValueError, OSError) as exc:
        print(f"p2pr health: {exc}", file=sys.stderr)
        return 2
    if not (settings.bootstrap or settings.static_peers or settings.mdns):
        # Nothing given: join the pipelines that `p2pr pipeline up` keeps on this machine.
        kept = _kept_pipeline_addrs()
        if not kept:
            print(
                "p2pr health: no way to find the cluster: give --bootstrap, --peers-file, "
                "--mdns or P2PR_BOOTSTRAP_PEERS (or keep a pipeline running with "
                "`p2pr pipeline up`)",
                file=sys.stderr,
            )
            return 2
        settings = attrs.evolve(settings, bootstrap=tuple(kept))
        if not args.json:
            Console(stderr=True).print(
                f"[dim]joining the {len(kept)} nodes of the kept pipeline[/]"
            )
    observer = ClusterNode(settings)
    logging.basicConfig(level=logging.ERROR)
    return int(anyio.run(_observe, observer, args))


def _kept_pipeline_addrs() -> list[str]:
    """Addresses of the running kept pipelines (`p2pr pipeline up`); none without MLX."""
    try:
        from ..kept import kept_cluster_addrs
    except ImportError:  # installed without the inference extras
        return []
    return kept_cluster_addrs()


async def _observe(observer: ClusterNode, args: argparse.Namespace) -> int:
    code = 0
    async with anyio.create_task_group() as tg:
        await tg.start(observer.run)
        if args.once:
            heard = await _gather(observer, args.wait)
            _print_once(observer, args)
            if not heard:
                print(
                    f"p2pr health: no view from any node within {args.wait:g} s "
                    "(is the cluster reachable, and does it share the cluster secret?)",
                    file=sys.stderr,
                )
                code = 1
            # The snapshot is out: what py-libp2p logs while this observer's connections are
            # torn down (tasks refused by closing nurseries) says nothing about the cluster.
            logging.disable(logging.CRITICAL)
        elif args.json:
            while True:  # one JSON document per line, as views change
                print(json.dumps(observer.views.to_json()), flush=True)
                await anyio.sleep(0.5)
        else:
            with Live(_table(observer, args), refresh_per_second=4, console=_console()) as live:
                while True:
                    await anyio.sleep(0.5)
                    live.update(_table(observer, args))
        tg.cancel_scope.cancel()
    return code


async def _gather(observer: ClusterNode, wait: float) -> bool:
    """Until every node the views mention has published its own view (or `wait` runs out);
    whether any view from another node arrived at all."""
    deadline = time.monotonic() + wait
    while True:
        views = [
            v
            for v in observer.views.current()
            if v.node_id != observer.node_id and v.role != "observer"
        ]
        reported = {v.node_id for v in views}
        # Every node any view mentions as alive should have spoken for itself.
        mentioned = {
            p.peer
            for v in views
            for p in v.peers
            if p.connected and not p.observer and p.peer != observer.node_id
        }
        if (reported and mentioned <= reported) or time.monotonic() >= deadline:
            return bool(reported)
        await anyio.sleep(0.1)


def _print_once(observer: ClusterNode, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(observer.views.to_json()), flush=True)
    else:
        _console().print(_table(observer, args))


def _console() -> Console:
    # A pipe or a capture gets a wide table rather than rich's 80-column default.
    probe = Console()
    return probe if probe.is_terminal else Console(width=170)


def _address(peer: dict[str, Any]) -> str:
    listen = peer.get("listen_addrs") or []
    if listen:
        return str(listen[0]).split("/p2p/")[0]
    return str(peer.get("address") or "-")


def _short(peer: str) -> str:
    return f"…{peer[-8:]}" if len(peer) > 12 else peer


def _name(node_id: str, labels: dict[str, str]) -> str:
    """'stage 1 …abcd1234' for a node whose view has a label, else '…abcd1234'."""
    label = labels.get(node_id)
    return f"{label} {_short(node_id)}" if label else _short(node_id)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 1000:.1f}"


def _table(observer: ClusterNode, args: argparse.Namespace) -> Table:
    cluster = observer.views.to_json()
    table = Table(title=f"p2pr health — {len(cluster['nodes'])} nodes (as seen by each node)")
    for column in (
        "node",
        "peer",
        "address",
        "state",
        "RTT p50/p99 ms",
        "loss %",
        "retx",
        "NACKs",
        "cksum fail",
        "phi",
        "score",
        "last seen",
    ):
        table.add_column(
            column,
            justify="right" if column not in ("node", "peer", "address", "state") else "left",
        )
    colors = {"alive": "green", "suspect": "yellow", "dead": "red", "unknown": "dim"}
    labels = {node_id: view.get("label", "") for node_id, view in cluster["nodes"].items()}

    def order(peer_id: str) -> tuple[bool, str, str]:
        # Labelled nodes (pipeline stages) first, in label order: stage 0, stage 1, ...
        label = labels.get(peer_id, "")
        return (not label, label, peer_id)

    for node_id in sorted(cluster["nodes"], key=order):
        view = cluster["nodes"][node_id]
        for peer in sorted(view["peers"], key=lambda p: order(p["peer"])):
            if peer.get("observer") and not args.all:
                continue
            state = str(peer["state"]).lower()
            seen = peer.get("last_seen_s_ago")
            table.add_row(
                _name(node_id, labels),
                _name(peer["peer"], labels),
                _address(peer),
                f"[{colors.get(state, 'white')}]{state}[/]",
                f"{_ms(peer.get('rtt_p50'))}/{_ms(peer.get('rtt_p99'))}",
                f"{100 * peer['loss_ratio']:.1f}",
                str(peer["retransmits"]),
                str(peer["nacks_received"]),
                str(peer["checksum_failures"]),
                f"{peer['phi']:.1f}",
                f"{peer['score']:.2f}",
                "-" if seen is None else f"{seen:.1f}s ago",
            )
    if cluster["duplicates"]:
        table.caption = f"[red]duplicate identities: {', '.join(cluster['duplicates'])}[/]"
    return table
