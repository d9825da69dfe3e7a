"""`p2pr node`: a cluster node (router, discovery, identity, shared health) until Ctrl-C.

    p2pr node [--listen /ip4/127.0.0.1/tcp/4001] [--bootstrap MULTIADDR ...] [--peers-file FILE]
              [--mdns] [--identity ~/.p2pr/identity.key] [--cluster-secret S] [--metrics-port N]

It prints its ready event (`{"event": "ready", "node_id", "addrs", "metrics_port"?}`,
`p2pr.launch`) once it listens.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

import anyio
from rich.console import Console

from discovery.identity import IdentityError, ephemeral_identity, load_identity
from discovery.node import ClusterNode, NodeSettings, settings_from
from discovery.peers import PeerAddressError, bootstrap_addrs, read_peers_file

from ..launch import print_event

__all__ = ["SECRET_ENV", "add_node_command", "discovery_args", "discovery_settings"]

SECRET_ENV = "P2PR_CLUSTER_SECRET"


def add_node_command(sub: Any) -> None:
    """Register `p2pr node`."""
    node = sub.add_parser("node", help="run a cluster node until Ctrl-C")
    discovery_args(node)
    node.add_argument(
        "--listen", default=None, help="/ip4/ADDR/tcp/PORT (default 127.0.0.1, any port)"
    )
    node.add_argument(
        "--identity",
        default="~/.p2pr/identity.key",
        help="ed25519 key file, created on first use ('none': a new identity each run)",
    )
    node.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus /metrics (0: any free port)"
    )
    node.set_defaults(func=_cmd_node)


def discovery_args(parser: argparse.ArgumentParser) -> None:
    """Add the options that say how to find the cluster."""
    parser.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        help="peer multiaddr (repeatable; also P2PR_BOOTSTRAP_PEERS)",
    )
    parser.add_argument("--peers-file", default=None, help="static peers, one multiaddr per line")
    parser.add_argument("--mdns", action="store_true", help="find peers on the LAN with mDNS")
    parser.add_argument("--cluster-secret", default=None, help=f"shared secret (or {SECRET_ENV})")


def discovery_settings(args: argparse.Namespace, role: str) -> NodeSettings:
    """NodeSettings from the discovery options (and `--listen`, `--metrics-port`)."""
    static = read_peers_file(args.peers_file) if args.peers_file else []
    return settings_from(
        listen=getattr(args, "listen", None),
        bootstrap=bootstrap_addrs(args.bootstrap),
        static_peers=static,
        mdns=args.mdns,
        cluster_secret=args.cluster_secret or os.environ.get(SECRET_ENV),
        role=role,
        metrics_port=getattr(args, "metrics_port", None),
    )


def _cmd_node(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        settings = discovery_settings(args, "node")
        identity = ephemeral_identity() if args.identity == "none" else load_identity(args.identity)
    except (IdentityError, PeerAddressError, ValueError, OSError) as exc:
        print(f"p2pr node: {exc}", file=sys.stderr)
        return 2
    node = ClusterNode(settings, identity)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            ready: dict[str, Any] = {"node_id": node.node_id, "addrs": node.router.listen_addrs}
            if node.metrics is not None:
                ready["metrics_port"] = node.metrics.port  # the one bound, if 0 was asked for
            print_event("ready", **ready)
            console.print(f"node {node.node_id} listening on {', '.join(node.router.listen_addrs)}")
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    console.print(f"{signal.Signals(signum).name}: shutting down")
                    tg.cancel_scope.cancel()
                    break

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    anyio.run(main)
    identity.release()
    return 0
