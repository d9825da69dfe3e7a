"""Direct streams named in `EngineConfig.redundant_streams` send each small message twice,
unless it is acknowledged first; the receiver delivers it once (real py-libp2p hosts, in this
process)."""

from __future__ import annotations

import anyio

from p2p_reliable import ProtocolConfig
from router import EngineConfig, PublishPolicy, Router, RouterConfig, TypedTopic
from router.faults import FaultConfig

# Only for the two nodes to find each other: a subscriber on it is a connected peer.
MEET = TypedTopic("meet", PublishPolicy.Always, bytes)
FAST, SLOW = "fast", "slow"
SMALL = b"token" * 8
LARGE = bytes(5000)
MESSAGES = 5


def test_the_engine_adds_its_streams_to_the_protocols() -> None:
    config = EngineConfig(
        protocol=ProtocolConfig(redundant_streams=frozenset({"a"})),
        redundant_streams=frozenset({"b"}),
        redundant_max_bytes=4096,
    )
    protocol = config.protocol_config()
    assert protocol.redundant_streams == {"a", "b"}
    assert protocol.redundant_max_bytes == 4096
    assert EngineConfig().protocol_config() == EngineConfig().protocol  # nothing named


async def redundant_copies(router: Router) -> int:
    engine = router.engine
    assert engine is not None
    copies: int = await router.query(lambda: engine.endpoint.stats.redundant_copies, timeout=10)
    return copies


async def test_small_messages_of_named_streams_go_twice_and_arrive_once() -> None:
    sender = Router.create(
        config=RouterConfig(
            engine=EngineConfig(redundant_streams=frozenset({FAST}), redundant_max_bytes=1024)
        )
    )
    # The receiver takes every frame in 50 ms late, so no acknowledgement can come back
    # before the copy is due (`redundant_spacing`, 2 ms).
    late = RouterConfig(engine=EngineConfig(faults=FaultConfig(delay=0.05)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.run)
        await sender.wait_ready()
        receiver = Router.create(bootstrap_peers=sender.listen_addrs, config=late)
        await receiver.register_topic(MEET)
        inboxes = {stream: receiver.direct_receiver(stream) for stream in (FAST, SLOW)}
        tg.start_soon(receiver.run)
        await receiver.wait_ready()
        with anyio.fail_after(30):
            await sender.wait_for_subscriber(MEET.topic, receiver.node_id)
        sent = {FAST: [SMALL + bytes([i]) for i in range(MESSAGES)] + [LARGE]}
        sent[SLOW] = [SMALL + bytes([i]) for i in range(MESSAGES)]
        for stream, payloads in sent.items():
            for payload in payloads:
                await sender.send_to(receiver.node_id, stream, payload)
        with anyio.fail_after(30):
            for stream, payloads in sent.items():
                got = [(await inboxes[stream].receive()).payload for _ in payloads]
                assert got == payloads, stream  # each once, in order
            await sender.drain()
        # Every small message of the named stream went twice; the large one and those of
        # the other stream once.
        assert await redundant_copies(sender) == MESSAGES
        for inbox in inboxes.values():
            assert inbox.collect() == []  # no duplicate delivered
        tg.cancel_scope.cancel()
