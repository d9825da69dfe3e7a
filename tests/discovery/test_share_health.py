"""Health sharing for a process that runs its own router (a stage node): its view reaches
the others on `p2pr/health`, labelled; `P2PR_SHARE_HEALTH=0` turns it off. Real py-libp2p
routers in this process."""

from __future__ import annotations

import anyio
import pytest

from discovery.health import HEALTH_TOPIC
from discovery.share import SHARE_HEALTH_ENV, share_health, sharing_enabled
from router import Router


def test_the_switch_reads_the_environment() -> None:
    assert sharing_enabled({}) and sharing_enabled({SHARE_HEALTH_ENV: "1"})
    for off in ("0", "false", "No", " off "):
        assert not sharing_enabled({SHARE_HEALTH_ENV: off})


async def test_a_stage_shares_its_view_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stage, watcher = Router.create(), Router.create()
    await watcher.register_topic(HEALTH_TOPIC)
    views = watcher.receiver(HEALTH_TOPIC)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.run)
        await stage.wait_ready()
        tg.start_soon(watcher.run)
        await watcher.wait_ready()
        watcher.add_peer_addr(stage.listen_addrs[0])

        # Turned off: it returns at once, and the topic is not even registered.
        monkeypatch.setenv(SHARE_HEALTH_ENV, "0")
        with anyio.fail_after(5):
            await share_health(stage, "stage", "stage 0")
        assert HEALTH_TOPIC.topic not in stage.topic_routers

        # On (the default): the stage's view reaches the watcher, labelled.
        monkeypatch.delenv(SHARE_HEALTH_ENV)
        tg.start_soon(share_health, stage, "stage", "stage 0")
        with anyio.fail_after(30):
            async for view in views:
                if view.node_id == stage.node_id:
                    break
        assert (view.role, view.label) == ("stage", "stage 0")
        assert HEALTH_TOPIC.topic in stage.topic_routers
        tg.cancel_scope.cancel()
