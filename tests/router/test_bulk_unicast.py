"""Large topic frames go to each subscriber over its direct stream while the topic has few
subscribers, and through gossipsub above that (README, "The router"): real py-libp2p hosts,
in this process."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from router import EngineConfig, PublishPolicy, Receiver, Router, RouterConfig, TypedTopic

BULK = TypedTopic("bulk", PublishPolicy.Always, bytes)
# 100 KiB that do not compress: one frame above the 64 KiB threshold.
LARGE = random.Random(7).randbytes(100 * 1024)
SMALL = b"s" * 1024


def test_the_defaults_are_the_documented_ones() -> None:
    config = EngineConfig()
    assert config.bulk_unicast_bytes == 64 * 1024 and config.bulk_max_subscribers == 8


@asynccontextmanager
async def started(router: Router, tg: anyio.abc.TaskGroup) -> AsyncIterator[Receiver[bytes]]:
    await router.register_topic(BULK)
    inbox = router.receiver(BULK)
    tg.start_soon(router.run)
    await router.wait_ready()
    yield inbox


async def sent(router: Router) -> tuple[int, int]:
    """(bytes published through gossipsub, bytes written to direct streams): control frames
    (acks, heartbeats, SYNC) are small beside the large frame."""
    engine = router.engine
    assert engine is not None
    result: tuple[int, int] = await router.query(
        lambda: (engine.gossip.published_bytes, engine.directs.stats.bytes_sent), timeout=10
    )
    return result


async def delivered(inbox: Receiver[bytes], payload: bytes) -> None:
    with anyio.fail_after(30):
        assert await inbox.receive() == payload


async def test_large_frames_go_direct_up_to_the_limit_then_through_gossipsub() -> None:
    # One subscriber allowed for bulk unicast (the default is 8: the rule is the same).
    config = RouterConfig(engine=EngineConfig(bulk_max_subscribers=1))
    publisher = Router.create(config=config)
    async with anyio.create_task_group() as tg:
        async with started(publisher, tg) as own:
            first = Router.create(bootstrap_peers=publisher.listen_addrs)
            async with started(first, tg) as first_inbox:
                with anyio.fail_after(30):
                    await publisher.wait_for_subscribers(BULK.topic, 1)
                await _check_routes(publisher, own, [first_inbox])
                second = Router.create(bootstrap_peers=publisher.listen_addrs)
                async with started(second, tg) as second_inbox:
                    with anyio.fail_after(30):
                        await publisher.wait_for_subscribers(BULK.topic, 2)
                    gossip, _ = await sent(publisher)
                    await publisher.sender(BULK).send(LARGE)
                    for inbox in (own, first_inbox, second_inbox):
                        await delivered(inbox, LARGE)
                    with anyio.fail_after(30):
                        await publisher.drain()
                    # Two subscribers, above the limit: the large frame went through gossipsub.
                    after, _ = await sent(publisher)
                    assert after - gossip >= len(LARGE)
        tg.cancel_scope.cancel()


async def _check_routes(publisher: Router, own: Receiver[bytes], inboxes: list[Any]) -> None:
    """One subscriber: a large frame goes over its direct stream, a small one through
    gossipsub."""
    gossip, direct = await sent(publisher)
    await publisher.sender(BULK).send(LARGE)
    for inbox in (own, *inboxes):
        await delivered(inbox, LARGE)
    with anyio.fail_after(30):
        await publisher.drain()
    after_large = await sent(publisher)
    assert after_large[0] - gossip < len(LARGE), "the large frame went through gossipsub"
    assert after_large[1] - direct >= len(LARGE)
    await publisher.sender(BULK).send(SMALL)
    for inbox in (own, *inboxes):
        await delivered(inbox, SMALL)
    with anyio.fail_after(30):
        await publisher.drain()
    after_small = await sent(publisher)
    assert after_small[0] - after_large[0] >= len(SMALL)  # small frames take gossipsub
