"""Health sharing for a process that already runs its own `Router` (a pipeline stage node).

    tg.start_soon(share_health, router, "stage", "stage 1")

runs `ClusterNode.share_health`'s loops on that router: it publishes the router's view of its
peers on the `p2pr/health` topic (at once on any state change, else every second) and
collects the others', so that `p2pr health` shows these processes next to `p2pr node`s.
`P2PR_SHARE_HEALTH=0` in a process's environment turns it off (e.g. to measure a stage
without the extra topic traffic).
"""

from __future__ import annotations

import os

from router import Router

from .health import HEALTH_TOPIC
from .identity import NodeIdentity
from .node import ClusterNode, NodeSettings

SHARE_HEALTH_ENV = "P2PR_SHARE_HEALTH"


def sharing_enabled(environ: dict[str, str] | None = None) -> bool:
    """False when `P2PR_SHARE_HEALTH` is 0/false/no/off."""
    value = (os.environ if environ is None else environ).get(SHARE_HEALTH_ENV, "")
    return value.strip().lower() not in ("0", "false", "no", "off")


async def share_health(
    router: Router, role: str = "node", label: str = "", silent_peers_observe: bool = True
) -> None:
    """Publish `router`'s health view (as `role`, named `label`) and collect the others'
    until cancelled; registers the health topic if the router has not.

    With `silent_peers_observe`, peers that never published a view (pipeline clients) are
    flagged as observers, so that `p2pr health` does not list a client that left as dead.

    Returns at once when sharing is turned off (`P2PR_SHARE_HEALTH=0`).
    """
    if not sharing_enabled():
        return
    if HEALTH_TOPIC.topic not in router.topic_routers:
        await router.register_topic(HEALTH_TOPIC)
    # The view must carry the router's own peer id, so the identity is the router's key.
    identity = NodeIdentity(router.key_pair, None)
    settings = NodeSettings(role=role, label=label, silent_peers_observe=silent_peers_observe)
    node = ClusterNode(settings, identity, router=router)
    await node.share_health()
