"""Who a connected peer is, and when the application hears of it.

A libp2p connection says nothing about what is on the other end. Every engine therefore sends
each peer it connects to a `Hello` on a stream of its own (`HELLO_PROTOCOL`): its role (a
cluster `member`, or an `observer` such as `p2pr health` that only watches) and the topics it
subscribes to. `Membership` turns connections and hellos into the connection events the
application sees:

- a peer is announced (`connected=True`) once it is connected AND has said hello as a member,
  so that by then this node already knows its subscriptions (a message published in reply to
  the announcement reaches it) and an observer never triggers anything (exo elects a master
  on every connection event);
- it is withdrawn (`connected=False`) when its last connection closes, whether the peer left,
  was killed, or was found hung and disconnected by this node.

Sans-IO: the engine feeds it events and acts on the `MembershipChange`s it returns.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
import msgpack

HELLO_PROTOCOL = "/p2pr/hello/1.0.0"
HELLO_VERSION = 1
MAX_HELLO_BYTES = 64 * 1024
MAX_HELLO_TOPICS = 256
MAX_TOPIC_LEN = 256


class Role(enum.StrEnum):
    """What a peer is to the cluster."""

    MEMBER = "member"
    OBSERVER = "observer"  # watches (health views) but takes no part: never announced


class HelloError(ValueError):
    """Bytes that are not a valid Hello."""


@attrs.frozen
class Hello:
    """What a peer says about itself right after connecting (and again on any change)."""

    role: Role
    topics: frozenset[str]
    epoch: int  # the engine's run: a restart sends a larger one
    seq: int = 0  # grows with every change within a run: a late, older hello is ignored

    def encode(self) -> bytes:
        """The wire form: a msgpack map."""
        body = {
            "v": HELLO_VERSION,
            "role": self.role.value,
            "topics": sorted(self.topics),
            "epoch": self.epoch,
            "seq": self.seq,
        }
        data: bytes = msgpack.packb(body)
        return data

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        """Parse and validate; raises HelloError on anything unexpected."""
        if len(data) > MAX_HELLO_BYTES:
            raise HelloError(f"hello of {len(data)} bytes exceeds {MAX_HELLO_BYTES}")
        try:
            body: Any = msgpack.unpackb(data, raw=False, max_ext_len=0)
        except Exception as exc:
            raise HelloError(f"malformed hello: {type(exc).__name__}") from None
        if type(body) is not dict or set(body) != {"v", "role", "topics", "epoch", "seq"}:
            raise HelloError("hello is not a map of v, role, topics, epoch, seq")
        if body["v"] != HELLO_VERSION:
            raise HelloError(f"hello version {body['v']!r} is not {HELLO_VERSION}")
        try:
            role = Role(body["role"])
        except (ValueError, TypeError):
            raise HelloError(f"unknown role {body['role']!r}") from None
        topics = body["topics"]
        if type(topics) is not list or len(topics) > MAX_HELLO_TOPICS:
            raise HelloError("topics is not a list of at most 256 names")
        if not all(type(t) is str and 0 < len(t) <= MAX_TOPIC_LEN for t in topics):
            raise HelloError("a topic name is not a string of 1-256 characters")
        epoch, seq = body["epoch"], body["seq"]
        if not all(type(n) is int and 0 <= n < 1 << 63 for n in (epoch, seq)):
            raise HelloError("epoch and seq must be non-negative 63-bit integers")
        return cls(role=role, topics=frozenset(topics), epoch=epoch, seq=seq)


@attrs.frozen
class MembershipChange:
    """What the engine must do after an input: announce or withdraw `peer`, and which of its
    topic subscriptions appeared or went away."""

    peer: str
    announce: bool | None = None  # True: connected, False: disconnected, None: no change
    subscribed: frozenset[str] = frozenset()
    unsubscribed: frozenset[str] = frozenset()


@attrs.define
class _Peer:
    connected: bool = False
    hello: Hello | None = None
    announced: bool = False


class Membership:
    """Connection and hello state per peer; decides announcements."""

    def __init__(self) -> None:
        self._peers: dict[str, _Peer] = {}

    def on_connected(self, peer: str) -> MembershipChange:
        """The first connection to `peer` is up (the engine sends our hello now)."""
        state = self._peers.setdefault(peer, _Peer())
        state.connected = True
        return self._settle(peer, state, frozenset())

    def on_disconnected(self, peer: str) -> MembershipChange:
        """The last connection to `peer` closed: forget its hello (it may come back as
        another run, with other subscriptions), withdraw it if it was announced."""
        state = self._peers.pop(peer, None)
        if state is None:
            return MembershipChange(peer)
        topics = state.hello.topics if state.hello else frozenset()
        return MembershipChange(
            peer, announce=False if state.announced else None, unsubscribed=topics
        )

    def on_hello(self, peer: str, hello: Hello) -> MembershipChange:
        """`peer` said hello (again)."""
        state = self._peers.setdefault(peer, _Peer())
        before = state.hello.topics if state.hello else frozenset()
        if state.hello is not None and (hello.epoch, hello.seq) < (
            state.hello.epoch,
            state.hello.seq,
        ):
            return MembershipChange(peer)  # a late hello, older than the one we hold
        state.hello = hello
        return self._settle(peer, state, before)

    def _settle(self, peer: str, state: _Peer, before: frozenset[str]) -> MembershipChange:
        topics = state.hello.topics if state.hello else frozenset()
        member = state.hello is not None and state.hello.role is Role.MEMBER
        announce: bool | None = None
        if state.connected and member and not state.announced:
            state.announced, announce = True, True
        elif state.announced and not member:
            state.announced, announce = False, False
        return MembershipChange(
            peer,
            announce=announce,
            subscribed=topics - before if state.connected else frozenset(),
            unsubscribed=before - topics,
        )

    def hello_of(self, peer: str) -> Hello | None:
        """The latest hello from `peer` while it is connected."""
        state = self._peers.get(peer)
        return state.hello if state is not None else None

    def is_observer(self, peer: str) -> bool:
        """Whether `peer` said it only observes."""
        hello = self.hello_of(peer)
        return hello is not None and hello.role is Role.OBSERVER

    def announced(self) -> set[str]:
        """Peers the application has been told are connected."""
        return {p for p, s in self._peers.items() if s.announced}

    def subscribers(self, topic: str) -> set[str]:
        """Connected peers whose hello lists `topic`."""
        return {
            p
            for p, s in self._peers.items()
            if s.connected and s.hello is not None and topic in s.hello.topics
        }
