"""What the layers above use of a router: `RouterLike`.

`Router` (over py-libp2p) and `MemoryRouter` (in one process, for tests) both provide it, so
the stage node and the pipeline client run over either.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from p2p_reliable import Gap, Rejected, Unrecoverable

from .channels import Receiver, Sender
from .faults import FaultConfig
from .topic_router import DirectMessage
from .topics import TypedTopic

__all__ = ["RouterLike"]

T = TypeVar("T")


class RouterLike(Protocol):
    """Typed topics, point-to-point streams, connection and health views, counters."""

    @property
    def node_id(self) -> str:
        """This node's peer id."""

    @property
    def listen_addrs(self) -> list[str]:
        """Where others reach this node (multiaddrs with /p2p/<id>), once running."""

    @property
    def connected(self) -> set[str]:
        """Peers this node is connected to (members only: observers are never announced)."""

    @property
    def topic_routers(self) -> Mapping[str, Any]:
        """The registered topics."""

    @property
    def bad_payloads(self) -> Mapping[str, int]:
        """Items refused per peer for not being what their topic carries."""

    @property
    def protocol_events(self) -> Iterable[Gap | Unrecoverable | Rejected]:
        """The protocol's recent verdicts (bounded)."""

    async def register_topic(self, topic: TypedTopic[T]) -> None:
        """Add a topic (subscribes at once if running)."""

    def sender(self, topic: TypedTopic[T]) -> Sender[T]:
        """A sender for a registered topic."""

    def receiver(self, topic: TypedTopic[T]) -> Receiver[T]:
        """A fresh receiver of every item on a registered topic."""

    def direct_receiver(self, stream: str) -> Receiver[DirectMessage]:
        """A receiver of every point-to-point message sent to this node on `stream`."""

    async def send_to(self, peer: str, stream: str, payload: bytes) -> None:
        """Send `payload` to `peer` alone, reliably."""

    async def run(self) -> None:
        """Run until cancelled."""

    async def wait_ready(self) -> None:
        """Wait until `run` has started."""

    async def drain(self) -> None:
        """Wait until everything sent so far is acknowledged (or given up)."""

    def subscribers(self, topic: str) -> set[str]:
        """Remote peers subscribed to `topic`."""

    async def wait_for_subscriber(self, topic: str, peer: str) -> None:
        """Wait until `peer` subscribes to `topic`."""

    async def wait_protocol_event(self) -> None:
        """Wait for the next protocol verdict."""

    async def health(self) -> list[dict[str, Any]]:
        """This node's view of every peer it knows (a row per peer: `peer`, `state`, …)."""

    async def health_states(self) -> dict[str, str]:
        """Every known peer's state name."""

    async def counters(self, timeout: float | None = None) -> dict[str, Any]:
        """The protocol's counters, the fault shim's and every peer's health row."""

    def set_faults(self, faults: FaultConfig | None, partition: Collection[str] = ()) -> None:
        """Fault injection (chaos runs)."""

    def refused(self, peer: str, kind: str, detail: str) -> None:
        """Count (and hold against `peer`) a message the application refused."""

    def add_peer_addr(self, addr: str, source: str = "static") -> None:
        """Dial a peer at this multiaddr."""
