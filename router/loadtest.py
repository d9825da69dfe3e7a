"""A node process for multi-process experiments: tests and `p2pr bench router` run several.

    python -m router.loadtest --publish 5000 --size 1024 --expect 2 --peers 2 ...

It prints one JSON line when ready (`{"ready": ..., "addrs": [...]}`), publishes its messages,
checks everything it receives (order per publisher, duplicates, an independent SHA-256 of each
payload, latency), prints one JSON result line, then keeps serving acks and repairs until its
standard input closes, so that no node leaves while others still need it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import struct
import sys
import time
from typing import Any

import anyio
import attrs

from p2p_reliable import ProtocolConfig
from p2p_reliable.health import nearest_rank

from .engine import EngineConfig
from .faults import FAULTS_ENV, FaultConfig
from .router import Router, RouterConfig
from .topics import PublishPolicy, TypedTopic

TOPIC = TypedTopic("load", PublishPolicy.Always, bytes)
_HEADER = struct.Struct("!IIdI")  # publisher index, message index, send time, body length


def make_payload(publisher: int, index: int, size: int) -> bytes:
    """A message whose integrity the receiver checks without trusting the protocol."""
    body = os.urandom(max(0, size - _HEADER.size - 32))
    head = _HEADER.pack(publisher, index, time.time(), len(body))
    return head + body + hashlib.sha256(head + body).digest()


def check_payload(data: bytes) -> tuple[int, int, float] | None:
    """(publisher, index, send time) of an intact payload; None if it is damaged."""
    if len(data) < _HEADER.size + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return None
    publisher, index, sent, length = _HEADER.unpack_from(data)
    if length != len(data) - _HEADER.size - 32:
        return None
    return publisher, index, sent


@attrs.define
class _Tally:
    received: int = 0
    next_index: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    corrupted: int = 0
    latencies: list[float] = attrs.Factory(list)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    return nearest_rank(sorted(values), p) if values else None


async def run_node(args: argparse.Namespace) -> dict[str, Any]:
    """Run one experiment node; return its result."""
    faults = FaultConfig.parse(args.faults or os.environ.get(FAULTS_ENV, ""))
    protocol = ProtocolConfig(
        flow_control=True, receive_window=args.receive_window, window_bytes=args.window_mib << 20
    )
    config = RouterConfig(
        engine=EngineConfig(protocol=protocol, faults=faults), receiver_buffer=args.buffer
    )
    router = Router.create(bootstrap_peers=args.bootstrap, config=config)
    await router.register_topic(TOPIC)
    receiver = router.receiver(TOPIC)
    direct = router.direct_receiver(TOPIC.topic)
    last_arrival = 0.0
    tallies: dict[int, _Tally] = {}
    expected = args.expect * args.expect_count
    done = anyio.Event()
    result: dict[str, Any] = {}

    async def consume_direct() -> None:
        async with anyio.create_task_group() as tg:
            send, recv = anyio.create_memory_object_stream[bytes](16)
            tg.start_soon(_forward_direct, direct, send)
            await consume(recv)

    async def consume(items: Any) -> None:
        nonlocal last_arrival
        total = 0
        async for data in items:
            now = last_arrival = time.time()
            if args.consume_delay:
                await anyio.sleep(args.consume_delay)
            checked = check_payload(data)
            if checked is None:
                tallies.setdefault(-1, _Tally()).corrupted += 1
                continue
            publisher, index, sent = checked
            if publisher == args.index:
                continue  # our own items come back through the local fan-out, as in exo
            tally = tallies.setdefault(publisher, _Tally())
            if index < tally.next_index:
                tally.duplicates += 1
                continue
            if index > tally.next_index:
                tally.out_of_order += 1
            tally.next_index = index + 1
            tally.received += 1
            tally.latencies.append(now - sent)
            total += 1
            if total >= expected:
                done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        await router.wait_ready()
        print(json.dumps({"ready": router.node_id, "addrs": router.listen_addrs}), flush=True)
        if args.mode == "direct":
            tg.start_soon(consume_direct)
        else:
            tg.start_soon(consume, receiver)
        with anyio.fail_after(args.timeout):
            await router.wait_for_subscribers(TOPIC.topic, args.peers)
        # As for bare gossipsub: let the mesh form (1 s heartbeats) before measuring.
        await anyio.sleep(args.warmup)
        sender = router.sender(TOPIC)
        peers = sorted(router.subscribers(TOPIC.topic))
        first_send = time.time()
        started = time.perf_counter()
        for i in range(args.publish):
            payload = make_payload(args.index, i, args.size)
            if args.mode == "direct":
                for peer in peers:
                    await router.send_to(peer, TOPIC.topic, payload)
            else:
                await sender.send(payload)
            if args.rate:
                await anyio.sleep(max(0.0, started + (i + 1) / args.rate - time.perf_counter()))
        publish_seconds = time.perf_counter() - started
        with anyio.move_on_after(args.timeout):
            if expected:
                await done.wait()
        elapsed = time.perf_counter() - started
        with anyio.move_on_after(args.timeout):
            await router.drain()  # our messages are all acknowledged: final counters
        drained = time.perf_counter() - started
        engine = router.engine
        assert engine is not None
        result = {
            "node": router.node_id,
            "index": args.index,
            "published": args.publish,
            "publish_seconds": publish_seconds,
            "elapsed": elapsed,
            "drained": drained,
            "first_send": first_send,
            "last_arrival": last_arrival,
            "expected": expected,
            "received": sum(t.received for t in tallies.values() if t is not tallies.get(-1)),
            "per_publisher": {
                str(p): {
                    "received": t.received,
                    "out_of_order": t.out_of_order,
                    "duplicates": t.duplicates,
                    "corrupted": t.corrupted,
                    "latency_p50": percentile(t.latencies, 50),
                    "latency_p99": percentile(t.latencies, 99),
                }
                for p, t in tallies.items()
            },
            "protocol": engine.endpoint.stats.as_dict(),
            "engine": attrs.asdict(engine.stats),
            "shim": attrs.asdict(engine.shim.stats),
            "bad_payloads": dict(router.bad_payloads),
        }
        print(json.dumps(result), flush=True)
        # Keep acking and repairing for the others until the orchestrator lets us go.
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        tg.cancel_scope.cancel()
    return result


async def _forward_direct(source: Any, sink: Any) -> None:
    async with sink:
        async for message in source:
            await sink.send(message.payload)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m router.loadtest`."""
    parser = argparse.ArgumentParser(prog="python -m router.loadtest")
    parser.add_argument("--index", type=int, default=0, help="this publisher's number")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--peers", type=int, default=0, help="subscribers to wait for")
    parser.add_argument("--publish", type=int, default=0, help="messages to publish")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--expect", type=int, default=0, help="publishers to hear from")
    parser.add_argument("--expect-count", type=int, default=0, help="messages per publisher")
    parser.add_argument("--faults", default=None, help="fault shim settings (P2PR_FAULTS)")
    parser.add_argument("--consume-delay", type=float, default=0.0)
    parser.add_argument("--buffer", type=int, default=10_000, help="receiver channel size")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--backend", default="trio", choices=["trio", "asyncio"])
    parser.add_argument("--mode", default="topic", choices=["topic", "direct"])
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s (0: flat out)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds before publishing")
    parser.add_argument("--receive-window", type=int, default=4096, help="flow-control credit")
    parser.add_argument("--window-mib", type=int, default=4, help="unacked MiB per receiver")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    anyio.run(run_node, args, backend=args.backend)


if __name__ == "__main__":
    main()
