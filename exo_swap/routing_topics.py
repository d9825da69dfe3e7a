"""exo's `exo.routing.topics`, on p2p-reliable's typed topics.

`PublishPolicy` and `TypedTopic` are p2p-reliable's (router.topics): the same policy values
and the same wire format for exo's pydantic models (`model_dump_json` out,
`model_validate_json` in), so our Router routes exo's topics as they are. A payload that does
not validate is counted against its sender and dropped instead of tearing the node down.
The six topics are exo's, with exo's names, policies and model types.
"""

from __future__ import annotations

from exo.routing.connection_message import ConnectionMessage  # type: ignore[import-not-found]
from exo.shared.election import ElectionMessage  # type: ignore[import-not-found]
from exo.shared.types.commands import (  # type: ignore[import-not-found]
    ForwarderCommand,
    ForwarderDownloadCommand,
)
from exo.shared.types.events import (  # type: ignore[import-not-found]
    GlobalForwarderEvent,
    LocalForwarderEvent,
)

from router.topics import PublishPolicy, TypedTopic

__all__ = [
    "COMMANDS",
    "CONNECTION_MESSAGES",
    "DOWNLOAD_COMMANDS",
    "ELECTION_MESSAGES",
    "GLOBAL_EVENTS",
    "LOCAL_EVENTS",
    "PublishPolicy",
    "TypedTopic",
]

GLOBAL_EVENTS = TypedTopic("global_events", PublishPolicy.Always, GlobalForwarderEvent)
LOCAL_EVENTS = TypedTopic("local_events", PublishPolicy.Always, LocalForwarderEvent)
COMMANDS = TypedTopic("commands", PublishPolicy.Always, ForwarderCommand)
ELECTION_MESSAGES = TypedTopic("election_messages", PublishPolicy.Always, ElectionMessage)
CONNECTION_MESSAGES = TypedTopic("connection_messages", PublishPolicy.Never, ConnectionMessage)
DOWNLOAD_COMMANDS = TypedTopic("download_commands", PublishPolicy.Always, ForwarderDownloadCommand)
