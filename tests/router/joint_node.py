"""A router node process for the join/hang/return tests (tests/router/test_router_joints.py).

    python tests/router/joint_node.py [--bootstrap ADDR]... [--role member|observer]

Prints JSON lines: {"event": "ready", "node_id": id, "addrs": [...]} once listening, then {"conn": peer,
"connected": bool, "t": seconds} for every connection event the application hears, and
{"got": n} whenever messages arrive on the topic `joints`. Reads commands on stdin:
`publish N` (N messages on `joints`), `quit`.

With `--trials`, it instead serves join trials (many fresh routers in one process):
`sub` starts a subscriber router and prints {"sub": addr}; `pub ADDR N` starts a router that
bootstraps from ADDR and publishes N messages the moment the connection event arrives,
then prints {"published": n}; `count` prints {"count": n} for the current subscriber (after
waiting up to 10 s for N messages); `reset` closes both routers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import anyio
import attrs

from router import CONNECTION_MESSAGES, PublishPolicy, Router, RouterConfig, TypedTopic
from router.config import EngineConfig
from router.membership import Role


@attrs.frozen
class Item:
    n: int


JOINTS = TypedTopic("joints", PublishPolicy.Always, Item)
T0 = time.monotonic()


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def node(args: argparse.Namespace) -> None:
    config = RouterConfig(engine=EngineConfig(role=Role(args.role)))
    router = Router.create(bootstrap_peers=args.bootstrap, config=config)
    await router.register_topic(JOINTS)
    await router.register_topic(CONNECTION_MESSAGES)
    conns, items, out = (
        router.receiver(CONNECTION_MESSAGES),
        router.receiver(JOINTS),
        router.sender(JOINTS),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        await router.wait_ready()
        say(event="ready", node_id=router.node_id, addrs=router.listen_addrs)

        async def watch_conns() -> None:
            async for msg in conns:
                say(conn=msg.node_id, connected=msg.connected, t=round(time.monotonic() - T0, 3))

        async def watch_items() -> None:
            got = 0
            async for _ in items:
                got += 1
                say(got=got)

        tg.start_soon(watch_conns)
        tg.start_soon(watch_items)
        async for line in _stdin_lines():
            if line.startswith("publish"):
                for i in range(int(line.split()[1])):
                    await out.send(Item(i))
            elif line == "quit":
                break
        tg.cancel_scope.cancel()


async def trials() -> None:
    async with anyio.create_task_group() as tg:
        sub: _Trial | None = None
        pub: _Trial | None = None
        async for line in _stdin_lines():
            words = line.split()
            if words[0] == "sub":
                sub = await _Trial.start(tg, ())
                say(sub=sub.router.listen_addrs[0])
            elif words[0] == "pub":
                pub = await _Trial.start(tg, (words[1],), publish=int(words[2]))
                with anyio.fail_after(30):
                    await pub.done.wait()
                say(published=pub.published)
            elif words[0] == "count" and sub is not None:
                with anyio.move_on_after(10):
                    while sub.received < int(words[1]):
                        await sub.changed.wait()
                        sub.changed = anyio.Event()
                say(count=sub.received, values=sub.values[:50])
            elif words[0] == "reset":
                for trial in (sub, pub):
                    if trial is not None:
                        trial.scope.cancel()
                sub = pub = None
                say(reset=True)
            elif words[0] == "quit":
                break
        tg.cancel_scope.cancel()


class _Trial:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.scope = anyio.CancelScope()
        self.received = 0
        self.values: list[int] = []
        self.changed = anyio.Event()
        self.done = anyio.Event()
        self.published = 0

    @classmethod
    async def start(
        cls, tg: anyio.abc.TaskGroup, bootstrap: tuple[str, ...], publish: int = 0
    ) -> _Trial:
        router = Router.create(bootstrap_peers=bootstrap)
        await router.register_topic(JOINTS)
        await router.register_topic(CONNECTION_MESSAGES)
        trial = cls(router)
        items, conns, out = (
            router.receiver(JOINTS),
            router.receiver(CONNECTION_MESSAGES),
            router.sender(JOINTS),
        )

        async def run() -> None:
            with trial.scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(router.run)
                    inner.start_soon(trial._count, items)
                    if publish:
                        # As exo's election does: publish the moment the connection is heard.
                        async for msg in conns:
                            if msg.connected:
                                for i in range(publish):
                                    await out.send(Item(i))
                                trial.published = publish
                                trial.done.set()
                                break

        tg.start_soon(run)
        await router.wait_ready()
        return trial

    async def _count(self, items: Any) -> None:
        async for item in items:
            self.received += 1
            self.values.append(item.n)
            self.changed.set()


async def _stdin_lines() -> Any:
    stdin = anyio.wrap_file(sys.stdin)
    async for line in stdin:
        if line.strip():
            yield line.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--role", default="member")
    parser.add_argument("--trials", action="store_true")
    args = parser.parse_args()
    anyio.run(trials if args.trials else node, *(() if args.trials else (args,)))


if __name__ == "__main__":
    main()
