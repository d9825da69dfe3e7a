"""A node process for multi-process experiments: tests and `p2pr bench router` run several.

    python -m p2pr.bench.loadtest --publish 5000 --size 1024 --expect 2 --peers 2 ...

It prints its ready event (`{"event": "ready", "node_id": ..., "addrs": [...]}`, `p2pr.launch`),
publishes its messages,
checks everything it receives (order per publisher, duplicates, an independent SHA-256 of each
payload, latency), prints its `{"event": "result", ...}` line, then keeps serving acks and repairs until its
standard input closes, so that no node leaves while others still need it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import struct
import sys
import threading
import time
from typing import Any

import anyio
import attrs

from p2p_reliable import ProtocolConfig
from p2p_reliable.health import nearest_rank
from router import EngineConfig, FaultConfig, PublishPolicy, Router, RouterConfig, TypedTopic
from router.enginehost import ENGINE_THREAD
from router.faults import FAULTS_ENV

from ..launch import print_event

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


class _Receiving:
    """What a node receives: checked, tallied per publisher, timed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tallies: dict[int, _Tally] = {}
        self.expected = args.expect * args.expect_count
        self.done = anyio.Event()
        self.last_arrival = 0.0
        self.total = 0  # new messages of other publishers, over both ways in
        # With --record-consumption: when the application took each message (wall clock).
        self.consumed_at: list[float] = []

    async def consume(self, items: Any) -> None:
        async for data in items:
            now = self.last_arrival = time.time()
            if self.args.consume_delay:
                await anyio.sleep(self.args.consume_delay)
            if self.args.record_consumption:
                self.consumed_at.append(time.time())
            if self._tally(data, now):
                self.total += 1
                if self.total >= self.expected:
                    self.done.set()

    def _tally(self, data: bytes, now: float) -> bool:
        """Count one payload; whether it is a new message of another publisher."""
        checked = check_payload(data)
        if checked is None:
            self.tallies.setdefault(-1, _Tally()).corrupted += 1
            return False
        publisher, index, sent = checked
        if publisher == self.args.index:
            return False  # our own items come back through the local fan-out, as in exo
        tally = self.tallies.setdefault(publisher, _Tally())
        if index < tally.next_index:
            tally.duplicates += 1
            return False
        if index > tally.next_index:
            tally.out_of_order += 1
        tally.next_index = index + 1
        tally.received += 1
        tally.latencies.append(now - sent)
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "last_arrival": self.last_arrival,
            "expected": self.expected,
            "received": sum(t.received for p, t in self.tallies.items() if p != -1),
            "per_publisher": {
                str(p): {
                    "received": t.received,
                    "out_of_order": t.out_of_order,
                    "duplicates": t.duplicates,
                    "corrupted": t.corrupted,
                    "latency_p50": percentile(t.latencies, 50),
                    "latency_p99": percentile(t.latencies, 99),
                }
                for p, t in self.tallies.items()
            },
            "consumed_at": self.consumed_at,
        }


def _router(args: argparse.Namespace) -> Router:
    faults = FaultConfig.parse(args.faults or os.environ.get(FAULTS_ENV, ""))
    protocol = ProtocolConfig(
        flow_control=True, receive_window=args.receive_window, window_bytes=args.window_mib << 20
    )
    config = RouterConfig(
        engine=EngineConfig(protocol=protocol, faults=faults),
        receiver_buffer=args.buffer,
        engine_loop=args.engine_loop,
    )
    return Router.create(bootstrap_peers=args.bootstrap, config=config)


async def run_node(args: argparse.Namespace) -> dict[str, Any]:
    """Run one experiment node; return its result."""
    router = _router(args)
    await router.register_topic(TOPIC)
    receiver = router.receiver(TOPIC)
    direct = router.direct_receiver(TOPIC.topic)
    receiving = _Receiving(args)
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        await router.wait_ready()
        print_event("ready", node_id=router.node_id, addrs=router.listen_addrs)
        # Both ways in, whatever this node sends: others may send the other way.
        send, recv = anyio.create_memory_object_stream[bytes](16)
        tg.start_soon(_forward_direct, direct, send)
        tg.start_soon(receiving.consume, recv)
        tg.start_soon(receiving.consume, receiver)
        with anyio.fail_after(args.timeout):
            await router.wait_for_subscribers(TOPIC.topic, args.peers)
        # As for bare gossipsub: let the mesh form (1 s heartbeats) before measuring.
        await anyio.sleep(args.warmup)
        result = await _publish(router, args)
        with anyio.move_on_after(args.timeout):
            if receiving.expected:
                await receiving.done.wait()
        result["elapsed"] = time.perf_counter() - result["started"]
        with anyio.move_on_after(args.timeout):
            await router.drain()  # our messages are all acknowledged: final counters
        result["drained"] = time.perf_counter() - result.pop("started")
        result["drained_at"] = time.time()
        counters = await router.counters()
        result.update(receiving.summary())
        result.update(protocol=counters["protocol"], shim=counters["shim"])
        result["bad_payloads"] = dict(router.bad_payloads)
        result["engine_thread"] = any(t.name == ENGINE_THREAD for t in threading.enumerate())
        print_event("result", **result)
        # Keep acking and repairing for the others until the orchestrator lets us go.
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        tg.cancel_scope.cancel()
    return result


async def _publish(router: Router, args: argparse.Namespace) -> dict[str, Any]:
    """Publish this node's messages (flat out, or paced at `--rate`)."""
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
    return {
        "node": router.node_id,
        "index": args.index,
        "published": args.publish,
        "publish_seconds": time.perf_counter() - started,
        "first_send": first_send,
        "started": started,
    }


async def _forward_direct(source: Any, sink: Any) -> None:
    async with sink:
        async for message in source:
            await sink.send(message.payload)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m p2pr.bench.loadtest`."""
    parser = argparse.ArgumentParser(prog="python -m p2pr.bench.loadtest")
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
    parser.add_argument(
        "--engine-loop",
        default="thread",
        choices=["thread", "shared"],
        help="the engine on its own thread, or on this process's trio loop (RouterConfig)",
    )
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s (0: flat out)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds before publishing")
    parser.add_argument("--receive-window", type=int, default=4096, help="flow-control credit")
    parser.add_argument("--window-mib", type=int, default=4, help="unacked MiB per receiver")
    parser.add_argument(
        "--record-consumption",
        action="store_true",
        help="report when each message was consumed (wall clock, `consumed_at`)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    anyio.run(run_node, args, backend=args.backend)


if __name__ == "__main__":
    main()
