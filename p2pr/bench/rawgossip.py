"""A bare py-libp2p gossipsub node, the baseline `p2pr bench router` compares against.

Same host and gossipsub settings as the router (router.host), no reliability protocol: one
gossipsub message per application message, published with the outbound-queue wait that
keeps gossipsub from silently rejecting (the best lossless way to use it). Same command line
and event lines as p2pr.bench.loadtest, so p2pr.bench.nodes drives both.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import anyio
import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from router.host import build_host, build_pubsub, listen_addrs

from ..launch import print_event
from .loadtest import TOPIC, check_payload, make_payload, percentile


async def run_node(args: argparse.Namespace) -> None:
    """Publish and/or receive on the load topic over plain gossipsub."""
    key_pair = create_new_key_pair()
    addrs = listen_addrs("127.0.0.1", 0)
    host = build_host(key_pair, addrs)
    pubsub, gossipsub = build_pubsub(host)
    own = ID.from_pubkey(key_pair.public_key)
    received: dict[int, set[int]] = {}
    latencies: list[float] = []
    last_arrival = 0.0
    async with host.run(addrs), trio.open_nursery() as nursery:
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            for addr in args.bootstrap:
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
            subscription = await pubsub.subscribe(TOPIC.topic)
            print_event("ready", node_id=own.to_base58(), addrs=[str(a) for a in host.get_addrs()])

            async def consume() -> None:
                nonlocal last_arrival
                async for msg in subscription:
                    if msg.from_id == own.to_bytes():
                        continue
                    checked = check_payload(msg.data)
                    if checked is None:
                        continue
                    publisher, index, sent = checked
                    last_arrival = time.time()
                    latencies.append(last_arrival - sent)
                    received.setdefault(publisher, set()).add(index)

            nursery.start_soon(consume)
            with trio.fail_after(args.timeout):
                while len(pubsub.peer_topics.get(TOPIC.topic, ())) < args.peers:
                    await trio.sleep(0.02)
                await trio.sleep(1.5)  # let the mesh form: gossipsub heartbeats every second
            started = time.time()
            await _publish(pubsub, args)
            publish_seconds = time.time() - started
            expected = args.expect * args.expect_count
            await _settle(received, expected, args, started)
            result: dict[str, Any] = {
                "node": own.to_base58(),
                "index": args.index,
                "published": args.publish,
                "publish_seconds": publish_seconds,
                "expected": expected,
                "received": sum(len(s) for s in received.values()),
                "first_send": started,
                "last_arrival": last_arrival,
                "latency_p50": percentile(latencies, 50),
                "latency_p99": percentile(latencies, 99),
            }
            print_event("result", **result)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()


async def _publish(pubsub: Any, args: argparse.Namespace) -> None:
    for i in range(args.publish):
        # Never let gossipsub's outbound queues reject (its own tasks drain them).
        while any(len(q) > 8 for q in pubsub.peer_queues.values()):
            await trio.sleep(0.001)
        await pubsub.publish(TOPIC.topic, make_payload(args.index, i, args.size))


async def _settle(
    received: dict[int, set[int]], expected: int, args: argparse.Namespace, started: float
) -> None:
    """Until everything expected arrived, or nothing new came for `--settle` seconds:
    whatever has not arrived after a quiet spell never will (gossipsub has no repair)."""
    quiet = time.time()
    count = 0
    while time.time() - quiet < args.settle and time.time() - started < args.timeout:
        total = sum(len(s) for s in received.values())
        if total != count:
            count, quiet = total, time.time()
        if expected and total >= expected:
            return
        await trio.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m p2pr.bench.rawgossip`."""
    parser = argparse.ArgumentParser(prog="python -m p2pr.bench.rawgossip")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--peers", type=int, default=0)
    parser.add_argument("--publish", type=int, default=0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--expect-count", type=int, default=0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    trio.run(run_node, args)


if __name__ == "__main__":
    main()
