"""exo's `exo.routing.router`, backed by p2p-reliable's Router.

What exo uses, and where it comes from here:
- `Router.create(identity, bootstrap_peers, listen_port)`, `register_topic`, `sender`,
  `receiver`, `run`, `shutdown`: our `router.Router` (reliable typed topics over py-libp2p),
  with `sender`/`receiver` handing out exo's own channel types (`exo.utils.channels`) on the
  same stream state, so exo code gets exactly the classes it was written against.
- connection updates: our engine's `connection(peer, connected)` becomes exo's pydantic
  `ConnectionMessage` on exo's `connection_messages` topic (election's trigger).
- `get_node_id_keypair(path)`: our persistent identity (discovery.identity): an ed25519 key
  file created atomically on first use and reused on restart (same `12D3KooW…` node id),
  locked while the node runs; a second live process on the same file is refused.
- every exo node also shares p2p-reliable's health view on `p2pr/health` (the loops of
  discovery.node.ClusterNode, run on this Router), so `p2pr health` shows exo nodes.

Settings from the environment (exo's flags `--bootstrap-peers`/`EXO_BOOTSTRAP_PEERS` and
`--libp2p-port` arrive through `Router.create`):
- `EXO_LIBP2P_NAMESPACE` (exo's private-network namespace) or `P2PR_CLUSTER_SECRET`: our
  cluster secret; nodes of other namespaces are refused, and counted per peer.
- `EXO_P2PR_LISTEN_HOST` (default 0.0.0.0, as exo), `EXO_P2PR_MDNS` (default 1, as exo),
  `EXO_P2PR_RECEIVER_BUFFER` (default inf: exo's receivers are unbounded; a number bounds
  them and turns a slow reader into backpressure on the publishers), `EXO_P2PR_HEALTH`
  (default 1), `P2PR_FAULTS` (fault injection, as for `p2pr node`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs
from exo.routing.connection_message import ConnectionMessage  # type: ignore[import-not-found]
from exo.shared.constants import EXO_NODE_ID_KEYPAIR  # type: ignore[import-not-found]
from exo.utils.channels import Receiver, Sender  # type: ignore[import-not-found]
from libp2p.crypto.keys import KeyPair

from discovery.health import HEALTH_TOPIC
from discovery.identity import (
    NodeIdentity,
    ephemeral_identity,
    key_pair_from_bytes,
    load_identity,
)
from discovery.node import ClusterNode, NodeSettings
from router import Router as ReliableRouter
from router import RouterConfig, TopicRouter
from router.config import EngineConfig
from router.faults import FAULTS_ENV, FaultConfig
from router.topics import TypedTopic

__all__ = [
    "Keypair",
    "Router",
    "TopicRouter",
    "get_node_id_keypair",
    "router_config_from_env",
]

log = logging.getLogger("p2pr.exo")

T = TypeVar("T")

NAMESPACE_ENV = "EXO_LIBP2P_NAMESPACE"
SECRET_ENV = "P2PR_CLUSTER_SECRET"
LISTEN_HOST_ENV = "EXO_P2PR_LISTEN_HOST"
MDNS_ENV = "EXO_P2PR_MDNS"
BUFFER_ENV = "EXO_P2PR_RECEIVER_BUFFER"
HEALTH_ENV = "EXO_P2PR_HEALTH"
HEALTH_ROLE = "exo"


class Keypair:
    """exo's node key (`to_node_id()`, `to_bytes()`), over our NodeIdentity."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity

    @property
    def key_pair(self) -> KeyPair:
        """The libp2p key pair our Router runs with."""
        return self.identity.key_pair

    @staticmethod
    def generate() -> Keypair:
        """A fresh key that is not stored anywhere."""
        return Keypair(ephemeral_identity())

    @staticmethod
    def from_bytes(data: bytes) -> Keypair:
        """The key whose secret bytes are `data` (as `to_bytes()` gives them)."""
        return Keypair(NodeIdentity(key_pair_from_bytes(data), None))

    def to_bytes(self) -> bytes:
        """The secret key bytes (the identity file's content)."""
        return bytes(self.identity.key_pair.private_key.to_bytes())

    def to_node_id(self) -> str:
        """The libp2p peer id, 12D3KooW…, which exo uses as its NodeId."""
        return self.identity.node_id


# A process holds each identity file's lock once; asking again for the same file (exo's
# tests do) must not refuse ourselves.
_LOADED: dict[Path, Keypair] = {}


def get_node_id_keypair(
    path: str | bytes | PathLike[str] | PathLike[bytes] = EXO_NODE_ID_KEYPAIR,
) -> Keypair:
    """This node's key, kept in the file at `path` (created on first use, then reused).

    Raises discovery.identity.IdentityInUseError when another live process holds the file
    (two exo nodes with one HOME), IdentityError when the file is not a key.
    """
    raw = os.fsdecode(path)
    key_path = Path(raw).expanduser().resolve()
    keypair = _LOADED.get(key_path)
    if keypair is None:
        keypair = Keypair(load_identity(key_path))
        _LOADED[key_path] = keypair
        log.info("node id %s (identity file %s)", keypair.to_node_id(), key_path)
    return keypair


def _env_flag(name: str, default: bool, environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def router_config_from_env(environ: dict[str, str] | None = None) -> RouterConfig:
    """Our RouterConfig for an exo node, from exo's and our environment variables."""
    env = dict(os.environ) if environ is None else environ
    secret = env.get(SECRET_ENV) or env.get(NAMESPACE_ENV)
    faults = env.get(FAULTS_ENV)
    buffer_text = (env.get(BUFFER_ENV) or "inf").strip().lower()
    buffer: float = (
        math.inf if buffer_text in ("inf", "infinity", "unbounded") else int(buffer_text)
    )
    engine = EngineConfig(
        listen_host=env.get(LISTEN_HOST_ENV) or "0.0.0.0",
        enable_mdns=_env_flag(MDNS_ENV, True, env),
        cluster_secret=secret.encode() if secret else None,
        faults=FaultConfig.parse(faults) if faults else None,
    )
    return RouterConfig(engine=engine, receiver_buffer=buffer)


def _exo_sender(ours: Any) -> Any:
    """exo's Sender on the stream state of one of ours (ours is closed: one open end)."""
    theirs = Sender(ours._state, None)
    ours.close()
    return theirs


def _exo_receiver(ours: Any) -> Any:
    """exo's Receiver on the stream state of one of ours (ours is closed: one open end)."""
    theirs = Receiver(ours._state, None)
    ours.close()
    return theirs


class Router(ReliableRouter):
    """exo's Router: our reliable Router, handing out exo's channel types."""

    @classmethod
    def create(
        cls,
        identity: Keypair | NodeIdentity | KeyPair | None = None,
        bootstrap_peers: Sequence[str] = (),
        listen_port: int = 0,
        *,
        config: RouterConfig | None = None,
    ) -> Router:
        """A router for exo's node key (get_node_id_keypair()); settings from the environment
        unless `config` is given."""
        config = config or router_config_from_env()
        engine = attrs.evolve(
            config.engine,
            bootstrap=tuple(config.engine.bootstrap) + tuple(p for p in bootstrap_peers if p),
            listen_port=listen_port or config.engine.listen_port,
        )
        return cls(_node_identity(identity), attrs.evolve(config, engine=engine))

    def __init__(
        self, identity: NodeIdentity | KeyPair, config: RouterConfig, *, share_health: bool = True
    ) -> None:
        node_identity = identity if isinstance(identity, NodeIdentity) else _node_identity(identity)
        super().__init__(node_identity.key_pair, config)
        self.identity = node_identity
        self.share_health = share_health and _env_flag(HEALTH_ENV, True)
        self.cluster: ClusterNode | None = None

    # -- exo's interface -------------------------------------------------------------------

    def sender(self, topic: TypedTopic[T]) -> Any:
        """exo's Sender for `topic` (registered before)."""
        return _exo_sender(super().sender(topic))

    def receiver(self, topic: TypedTopic[T]) -> Any:
        """A fresh exo Receiver of every item on `topic` (registered before)."""
        return _exo_receiver(super().receiver(topic))

    async def run(self) -> None:
        """Run the node (and share its health view) until cancelled or shutdown()."""
        if self.share_health and HEALTH_TOPIC.topic not in self.topic_routers:
            await self.register_topic(HEALTH_TOPIC)
        log.info("exo router %s starting (p2p-reliable)", self.node_id)
        async with anyio.create_task_group() as tg:
            if self.share_health:
                tg.start_soon(self._share_health)
            await super().run()
            tg.cancel_scope.cancel()

    # -- engine callbacks ------------------------------------------------------------------

    def connection_message(self, peer: str, connected: bool) -> Any:
        """exo's own ConnectionMessage for a connection event."""
        return ConnectionMessage.from_peer(peer, connected)

    # -- health ----------------------------------------------------------------------------

    async def _share_health(self) -> None:
        """Publish this node's health view and read the others' (ClusterNode's own loops)."""
        node = ClusterNode(NodeSettings(role=HEALTH_ROLE), self.identity, router=self)
        self.cluster = node
        await node.share_health()


def _node_identity(identity: object) -> NodeIdentity:
    if identity is None:
        return ephemeral_identity()
    if isinstance(identity, Keypair):
        return identity.identity
    if isinstance(identity, NodeIdentity):
        return identity
    if isinstance(identity, KeyPair):
        return NodeIdentity(identity, None)
    to_bytes = getattr(identity, "to_bytes", None)
    if to_bytes is not None:  # another exo-style key (exo_rs.Keypair)
        return Keypair.from_bytes(to_bytes()).identity
    raise TypeError(f"not a node key: {identity!r}")
