"""Typed topics and publish policies, as in exo's `exo.routing.topics`."""

from __future__ import annotations

import enum
from typing import Any, Generic, TypeVar, cast

import attrs
import msgpack

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
    pydantic here), attrs classes (msgpack of their fields), or plain `bytes`/`str`.
    """

    topic: str
    publish_policy: PublishPolicy
    model_type: type[T]

    def serialize(self, item: T) -> bytes:
        """The bytes that travel for `item`."""
        if _is_pydantic(self.model_type):
            return cast(str, item.model_dump_json()).encode()  # type: ignore[attr-defined]
        if attrs.has(self.model_type):
            out: bytes = msgpack.packb(attrs.asdict(item), use_bin_type=True)  # type: ignore[arg-type]
            return out
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
                fields = msgpack.unpackb(data, raw=False)
                if not isinstance(fields, dict):
                    raise TypeError("not a field map")
                return cast(T, self.model_type(**fields))
            if self.model_type is bytes:
                return cast(T, bytes(data))
            if self.model_type is str:
                return cast(T, data.decode())
        except Exception as exc:
            raise TopicDecodeError(
                f"topic {self.topic!r}: bytes are not a {self.model_type.__name__}: {exc}"
            ) from None
        raise TopicDecodeError(f"topic {self.topic!r}: no codec for {self.model_type!r}")


@attrs.frozen
class ConnectionMessage:
    """A connection to `node_id` opened (connected=True) or closed."""

    node_id: str
    connected: bool


CONNECTION_MESSAGES = TypedTopic("connection_messages", PublishPolicy.Never, ConnectionMessage)
