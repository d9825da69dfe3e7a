"""A hostile peer, for tests/router/test_adversary.py: real py-libp2p hosts doing what a broken or
malicious node would. It never runs outside tests.

    python tests/router/attacker.py ATTACK --target MULTIADDR [--count N] [--victim PEER_ID]

Attacks that need well-formed envelopes run our own Router with its safeguards bent (a
publisher that ignores credit, a codec that sends a zstd bomb); raw-stream attacks run a bare
host. Prints one JSON line: {"attacker": peer id, "attack": name, ...what it did}, and exits.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import time
import urllib.request
from typing import Any

import anyio
import msgpack
import trio
import xxhash
import zstandard
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import encode_uvarint
from multiaddr import Multiaddr

from p2p_reliable.envelope import Flags
from p2p_reliable.fragment import MessageCodec, Split
from p2p_reliable.sender import StreamSender
from router import PublishPolicy, Router, TypedTopic
from router.directs import DIRECT_PROTOCOL
from router.host import MESHSUB_V11, build_host

RAW_HEALTH = TypedTopic("p2pr/health", PublishPolicy.Always, bytes)


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _row(peer: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "peer": peer, "state": "ALIVE", "phi": 0.0, "rtt_ewma": None, "rtt_p50": None,
        "rtt_p99": None, "loss_ratio": 0.0, "retransmit_ratio": 0.0, "sent": 0,
        "retransmits": 0, "received": 0, "nacks_sent": 0, "nacks_received": 0, "losses": 0,
        "checksum_failures": 0, "decode_errors": 0, "unrecoverable": 0, "rejections": {},
        "last_seen": None, "score": 1.0, "connected": True, "listen_addrs": [],
    }  # fmt: skip
    row.update(changes)
    return row


def _view(node_id: str, **changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "node_id": node_id, "instance": secrets.token_hex(8), "role": "node", "addrs": [],
        "sent_at": time.time(), "peers": [], "duplicates": [], "label": "",
    }  # fmt: skip
    view.update(changes)
    return view


async def _with_router(target: str, body: Any) -> dict[str, Any]:
    router = Router.create(bootstrap_peers=[target])
    await router.register_topic(RAW_HEALTH)
    out: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        await router.wait_ready()
        peer = target.rsplit("/p2p/", 1)[1]
        with anyio.fail_after(30):
            while peer not in router.connected:
                await anyio.sleep(0.05)
        out = await body(router, peer)
        with anyio.move_on_after(5):
            await router.drain()
        if Linger.metrics:
            # Frames the target has not read yet are lost when we hang up: on a loaded machine
            # it may still be working through the first window's worth. Stay (bounded) until
            # it has counted what this attack is about.
            with anyio.move_on_after(Linger.bound):
                while not await anyio.to_thread.run_sync(_counted, router.node_id):
                    await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    return {"attacker": router.node_id, **out}


class Linger:  # set once, from the command line
    metrics: str = ""
    kinds: frozenset[str] = frozenset()
    bound: float = 90.0


def _counted(me: str) -> bool:
    """Whether the target's /metrics counts a refusal of one of Linger.kinds against `me`."""
    try:
        with urllib.request.urlopen(Linger.metrics, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return False
    return any(
        f'kind="{kind}"' in line and f'peer="{me}"' in line
        for line in text.splitlines()
        for kind in Linger.kinds
    )


async def bad_views(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 2: well-formed envelopes on p2pr/health whose views have wrong field types."""

    async def body(router: Router, peer: str) -> dict[str, Any]:
        me = router.node_id
        shapes = [
            _view(me, peers=[1]),
            _view(me, peers=[{"state": "ALIVE"}]),
            _view(me, addrs=5),
            _view(me, sent_at="yesterday"),
            _view(me, peers=[_row(me, listen_addrs=5)]),
            _view(me, duplicates="x"),
            [1, 2, 3],
            "not a view",
        ]
        sender = router.sender(RAW_HEALTH)
        for i in range(count):
            await sender.send(msgpack.packb(shapes[i % len(shapes)]))
        return {"sent": count}

    return await _with_router(target, body)


async def impersonate(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 9: valid views published under another node's id (claiming it is a duplicate)."""

    async def body(router: Router, peer: str) -> dict[str, Any]:
        sender = router.sender(RAW_HEALTH)
        for _ in range(count):
            forged = _view(victim, duplicates=[victim, peer])
            await sender.send(msgpack.packb(forged))
            await anyio.sleep(0.05)
        return {"sent": count}

    return await _with_router(target, body)


async def addresses(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 10: one view listing attacker-chosen addresses; counts the dials they draw."""
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(10)]
    fake = create_new_key_pair()
    fake_id = ID.from_pubkey(fake.public_key).to_base58()
    addrs = [f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}/p2p/{fake_id}" for s in listeners]
    accepted = [0] * len(listeners)

    def accept_all(index: int) -> None:
        sock = listeners[index]
        sock.settimeout(0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            accepted[index] += 1
            conn.close()

    async def body(router: Router, peer: str) -> dict[str, Any]:
        sender = router.sender(RAW_HEALTH)
        me = router.node_id
        for _ in range(count):
            await sender.send(msgpack.packb(_view(me, addrs=addrs)))
            await anyio.sleep(0.5)
        async with anyio.create_task_group() as tg:
            for i in range(len(listeners)):
                tg.start_soon(anyio.to_thread.run_sync, accept_all, i)
        return {"sent": count, "dials_per_address": accepted}

    try:
        return await _with_router(target, body)
    finally:
        for sock in listeners:
            sock.close()


async def over_credit(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 3: a publisher that ignores the receiver's credit, to a stream nobody reads.

    Credit counts sequence numbers (`receive_window`), so small messages break it with the
    least data. With 64 KiB ones (384 MiB in all) this attacker, its own send bounds removed,
    queued its heartbeats behind its flood on a loaded machine: the target rightly cut it as
    hung, again after each redial, before any envelope passed the credit."""
    StreamSender.blocking_receivers = lambda self, size: []  # type: ignore[method-assign]

    async def body(router: Router, peer: str) -> dict[str, Any]:
        assert router.engine is not None
        router.engine.outbox._backlog = lambda peer: 0
        payload = secrets.token_bytes(256)
        for _ in range(count):
            await router.send_to(peer, "nobody-reads", payload)
        return {"sent": count, "bytes": count * len(payload)}

    return await _with_router(target, body)


async def zstd_bomb(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 4: small envelopes flagged compressed that declare 128 MiB (valid and not)."""
    size = 128 * 1024 * 1024
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(size))
    digest = xxhash.xxh3_64_digest(bytes(size))

    def split(self: MessageCodec, payload: bytes) -> Split:
        honest = payload[:1] == b"v"
        body = bomb + (digest if honest else b"\0" * 8)
        return Split(Flags.COMPRESSED, [body])

    MessageCodec.split = split  # type: ignore[method-assign]

    async def body(router: Router, peer: str) -> dict[str, Any]:
        for i in range(count):
            await router.send_to(peer, "bombs", b"v" if i % 2 else b"x")
        return {"sent": count, "bomb_bytes": len(bomb)}

    return await _with_router(target, body)


async def stream_names(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 7: thousands of distinct direct stream names."""

    async def body(router: Router, peer: str) -> dict[str, Any]:
        for i in range(count):
            await router.send_to(peer, f"name-{i}", b"x")
        return {"sent": count}

    return await _with_router(target, body)


async def _raw(target: str, body: Any) -> dict[str, Any]:
    key = create_new_key_pair()
    host = build_host(key, [Multiaddr("/ip4/127.0.0.1/tcp/0")])
    info = info_from_p2p_addr(Multiaddr(target))
    async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(30):
            await host.connect(info)
        out = await body(host, info.peer_id)
    return {"attacker": ID.from_pubkey(key.public_key).to_base58(), **out}


async def idle_streams(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 5: thousands of streams that never say anything, held open for a while."""

    async def body(host: Any, peer: ID) -> dict[str, Any]:
        opened = refused = 0
        streams = []
        for _ in range(count):
            try:
                with trio.fail_after(2):
                    streams.append(await host.new_stream(peer, [DIRECT_PROTOCOL]))
                opened += 1
            except Exception:
                refused += 1
        await trio.sleep(5)
        return {"opened": opened, "refused": refused}

    return await _raw(target, body)


async def slow_loris(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 6: direct streams each with an unfinished ~0.8 MB frame, then silence."""

    async def body(host: Any, peer: ID) -> dict[str, Any]:
        written = failed = 0
        streams = []
        for _ in range(count):
            try:
                with trio.fail_after(2):
                    stream = await host.new_stream(peer, [DIRECT_PROTOCOL])
                    await stream.write(encode_uvarint(900_000) + secrets.token_bytes(800_000))
                streams.append(stream)
                written += 1
            except Exception:
                failed += 1
        await trio.sleep(5)
        return {"written": written, "failed": failed}

    return await _raw(target, body)


async def oversized(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 8: a 2^40 length prefix, and an 11-byte varint, each on its own stream."""

    async def body(host: Any, peer: ID) -> dict[str, Any]:
        sent = 0
        for i in range(count):
            prefix = encode_uvarint(1 << 40) if i % 2 == 0 else b"\xff" * 10 + b"\x01"
            try:
                with trio.fail_after(2):
                    stream = await host.new_stream(peer, [DIRECT_PROTOCOL])
                    await stream.write(prefix + b"x" * 100)
                sent += 1
            except Exception:
                pass
        await trio.sleep(1)
        return {"sent": sent}

    return await _raw(target, body)


async def garbage(target: str, count: int, victim: str) -> dict[str, Any]:
    """Row 12: thousands of well-framed frames of garbage on one direct stream."""

    async def body(host: Any, peer: ID) -> dict[str, Any]:
        stream = await host.new_stream(peer, [DIRECT_PROTOCOL])
        sent = 0
        try:
            for _ in range(count):
                frame = secrets.token_bytes(200)
                await stream.write(encode_uvarint(len(frame)) + frame)
                sent += 1
        except Exception:
            pass
        await trio.sleep(1)
        return {"sent": sent}

    return await _raw(target, body)


async def bad_rpc(target: str, count: int, victim: str) -> dict[str, Any]:
    """Garbage where gossipsub expects a protobuf RPC (py-libp2p's pubsub reader lets the
    protobuf error escape its stream handler)."""

    async def body(host: Any, peer: ID) -> dict[str, Any]:
        sent = 0
        for _ in range(count):
            try:
                with trio.fail_after(2):
                    stream = await host.new_stream(peer, [MESHSUB_V11])
                    junk = b"\xff" * 40
                    await stream.write(encode_uvarint(len(junk)) + junk)
                sent += 1
            except Exception:
                pass
        await trio.sleep(1)
        return {"sent": sent}

    return await _raw(target, body)


async def bad_protocols(target: str, count: int, victim: str) -> dict[str, Any]:
    """Garbage on every other protocol a node serves (identify, identify push, ping, hello)."""
    protocols = ["/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0", "/p2pr/hello/1.0.0"]

    async def body(host: Any, peer: ID) -> dict[str, Any]:
        sent = 0
        for i in range(count):
            junk = secrets.token_bytes(60)
            try:
                with trio.fail_after(2):
                    stream = await host.new_stream(peer, [protocols[i % len(protocols)]])
                    await stream.write(encode_uvarint(len(junk)) + junk)
                    await stream.close()
                sent += 1
            except Exception:
                pass
        await trio.sleep(1)
        return {"sent": sent}

    return await _raw(target, body)


ATTACKS = {
    "bad-protocols": bad_protocols,
    "bad-rpc": bad_rpc,
    "bad-views": bad_views,
    "impersonate": impersonate,
    "addresses": addresses,
    "over-credit": over_credit,
    "zstd-bomb": zstd_bomb,
    "stream-names": stream_names,
    "idle-streams": idle_streams,
    "slow-loris": slow_loris,
    "oversized": oversized,
    "garbage": garbage,
}
RAW = {"idle-streams", "slow-loris", "oversized", "garbage", "bad-rpc", "bad-protocols"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--target", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--victim", default="")
    parser.add_argument("--metrics", default="", help="the target's /metrics URL: stay until")
    parser.add_argument("--kinds", default="", help="... it counts one of these (comma list)")
    args = parser.parse_args()
    Linger.metrics = args.metrics
    Linger.kinds = frozenset(k for k in args.kinds.split(",") if k)
    attack = ATTACKS[args.attack]
    if args.attack in RAW:
        result = trio.run(attack, args.target, args.count, args.victim)
    else:
        result = anyio.run(attack, args.target, args.count, args.victim)
    say(attack=args.attack, **result)


if __name__ == "__main__":
    main()
