"""Typed topics and publish policies, as in exo's `exo.routing.topics`."""

from __future__ import annotations

import enum
from typing import Any, Generic, TypeVar, cast

import attrs

from p2p_reliable import schema

T = TypeVar("T")


class PublishPolicy(str, enum.Enum):  # noqa: UP042 (exo's exact definition)
    """Where an item sent on a topic goes."""

    Never = "Never"
    """Never to the network: local receivers only."""
    Minimal = "Minimal"
    """To the network only when this node has no local receiver."""
    Always = "Always"
    """To the network and to local receivers."""


class TopicDecodeError(ValueError):
    """Bytes from the network are not a valid item of the topic's type."""


def _is_pydantic(model_type: type[Any]) -> bool:
    return hasattr(model_type, "model_validate_json") and hasattr(model_type, "model_dump_json")


@attrs.frozen
class TypedTopic(Generic[T]):
    """A named topic whose items are `model_type`.

    Items are pydantic models (exo's, through their own JSON methods, with no dependency on
    pydantic here), attrs classes (msgpack of their fields, decoded strictly by
    `p2p_reliable.schema`), or plain `bytes`/`str`.
    """

    topic: str
    publish_policy: PublishPolicy
    model_type: type[T]
    # An item that names its author in this field is accepted from the network only when
    # the author is the peer that published it (the libp2p peer id it signed with).
    origin_field: str | None = None

    def serialize(self, item: T) -> bytes:
        """The bytes that travel for `item`."""
        if _is_pydantic(self.model_type):
            return cast(str, item.model_dump_json()).encode()  # type: ignore[attr-defined]
        if attrs.has(self.model_type):
            return schema.encode(item)
        if self.model_type is bytes:
            return cast(bytes, item)
        if self.model_type is str:
            return cast(str, item).encode()
        raise TypeError(f"topic {self.topic!r}: no codec for {self.model_type!r}")

    def deserialize(self, data: bytes) -> T:
        """Parse bytes from the network; raise TopicDecodeError if they are not a `T`."""
        try:
            if _is_pydantic(self.model_type):
                return cast(T, self.model_type.model_validate_json(data.decode()))  # type: ignore[attr-defined]
            if attrs.has(self.model_type):
                # Strictly typed, every nested field checked (p2p_reliable.schema).
                return cast(T, schema.decode(data, self.model_type))
            if self.model_type is bytes:
                return cast(T, bytes(data))
            if self.model_type is str:
                return cast(T, data.decode())
        except Exception as exc:
            raise TopicDecodeError(
                f"topic {self.topic!r}: bytes are not a {self.model_type.__name__}: {exc}"
            ) from None
        raise TopicDecodeError(f"topic {self.topic!r}: no codec for {self.model_type!r}")

    def check_origin(self, item: T, origin: str) -> None:
        """Raise TopicDecodeError if `item` claims an author other than `origin`."""
        if self.origin_field is None:
            return
        claimed = getattr(item, self.origin_field, None)
        if claimed != origin:
            raise TopicDecodeError(
                f"topic {self.topic!r}: item claims to come from {claimed!r}, "
                f"but {origin} published it"
            )


@attrs.frozen
class ConnectionMessage:
    """A connection to `node_id` opened (connected=True) or closed."""

    node_id: str
    connected: bool


CONNECTION_MESSAGES = TypedTopic("connection_messages", PublishPolicy.Never, ConnectionMessage)
