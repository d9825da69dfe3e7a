"""The messages of the distributed pipeline, and the streams and topic they travel on.

Everything but the token stream goes point to point (`Router.send_to`, reliable, ordered,
exactly once, per (peer, stream)):

| stream                | from -> to                 | message                                   |
| --------------------- | -------------------------- | ----------------------------------------- |
| `p2pr.infer.request`  | client -> first stage      | `GenerateRequest`                         |
| `p2pr.infer.act`      | stage i -> stage i+1       | `Activation` (hidden state, codec bytes)  |
| `p2pr.infer.token`    | last stage -> first stage  | `TokenFeedback` (the sampled token)       |
| `p2pr.infer.head`     | last stage <-> first stage | `HeadShare` / `HeadPart` (split LM head)  |
| `p2pr.infer.ctl`      | anyone -> a stage          | `Release`, `InfoQuery`, `StatsQuery`,     |
|                       |                            | `Reconfigure`, `SetFaults`                |
| `p2pr.infer.client`   | a stage -> client          | `Failure`, `InfoReply`, `StatsReply`      |
| `p2pr.infer.chunks`   | last stage -> client       | `TokenChunk.to_bytes()` (direct delivery) |

Split LM head (`RequestMeta.head_split` > 0): to sample, the last stage sends its final
hidden state to the first stage (`HeadShare`), which holds the same matrix when the
embeddings are tied; each computes the logits of part of the vocabulary at the same time, and
the first stage's part comes back (`HeadPart`) to be joined and sampled on the last stage.
Without it the first stage would sit idle while the last computes the whole head. The last
stage picks the cut for each token (`head_split.HeadSplitTuner`) and names it in `HeadShare`;
it computes the whole head itself where splitting does not pay.

The token stream: the last stage makes one `TokenChunk` per generated token and, as the
request's `RequestMeta.chunks` asks, publishes it on the `TOKENS` topic ("topic": every
subscribed client sees every stream and picks its own request's chunks) or sends it to the
requester alone on `p2pr.infer.chunks` ("direct").

Failover (see `inference_glue.failover`): the client re-plans the layers over the nodes left
and sends each a `Reconfigure` with a new plan `epoch`; every node answers with its
`InfoReply`. The request then starts again under a new request id with `RequestMeta.resume`,
the tokens already generated, which the stages replay to rebuild their KV caches exactly
(or, after a hand-off of the lost layers, `RequestMeta.resume_of`: the stages take over the
previous attempt's caches and only the layers that moved are rebuilt).

Wire form: msgpack `[kind, {field: value}]`; `decode_message` checks the kind and the
fields and raises `MessageDecodeError` for anything else.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeAlias

import attrs
import msgpack

from inference_glue.tokens import TokenChunk
from p2p_reliable import schema
from router import PublishPolicy, TypedTopic

__all__ = [
    "ACTIVATION_STREAM",
    "CHUNK_DELIVERY",
    "CHUNK_STREAM",
    "CLIENT_STREAM",
    "CONTROL_STREAM",
    "FAILURE_KINDS",
    "HEAD_STREAM",
    "LATENCY_STREAMS",
    "REDUNDANT_MAX_BYTES",
    "REQUEST_STREAM",
    "TOKENS",
    "TOKEN_STREAM",
    "Activation",
    "Failure",
    "GenerateRequest",
    "HeadPart",
    "HeadShare",
    "InfoQuery",
    "InfoReply",
    "Message",
    "MessageDecodeError",
    "Reconfigure",
    "Release",
    "RequestMeta",
    "SetFaults",
    "StatsQuery",
    "StatsReply",
    "TokenFeedback",
    "decode_message",
    "encode_message",
]

REQUEST_STREAM = "p2pr.infer.request"
ACTIVATION_STREAM = "p2pr.infer.act"
TOKEN_STREAM = "p2pr.infer.token"
HEAD_STREAM = "p2pr.infer.head"
CONTROL_STREAM = "p2pr.infer.ctl"
CLIENT_STREAM = "p2pr.infer.client"
CHUNK_STREAM = "p2pr.infer.chunks"
CHUNK_DELIVERY = ("topic", "direct")
# Why a stage failed a request: "corrupt" (a hidden state from `suspect` failed its checksum),
# "stale" (the request's plan epoch is not the node's), "rebuild" (a resumed request could
# not take over the KV caches of its previous attempt: resume it with a full replay), "lost"
# (a message of it to or from `suspect` was given up or lost: resume it), "error" (anything
# else).
FAILURE_KINDS = ("error", "corrupt", "stale", "rebuild", "lost")

TOKENS: TypedTopic[TokenChunk] = TypedTopic("p2pr.infer.tokens", PublishPolicy.Always, TokenChunk)

# What every decode step waits for, one small message at a time: a lost frame of these has
# nothing behind it to reveal the loss, so each goes twice (`EngineConfig.redundant_streams`)
# when it is at most REDUNDANT_MAX_BYTES: a decode step's hidden state (a hidden size of 4096
# in float32 is 16 KiB), token feedback, the split head's exchange, the token chunks (direct
# or on the topic). A prefill's hidden states are larger and go once.
LATENCY_STREAMS = frozenset(
    {ACTIVATION_STREAM, TOKEN_STREAM, HEAD_STREAM, CHUNK_STREAM, TOKENS.topic}
)
REDUNDANT_MAX_BYTES = 32 * 1024


# The largest pipeline message: a prefill's hidden states (e.g. 2048 tokens x 8192 x 4 B)
# fit in the protocol's max_message_size; a decoder never needs more.
MAX_MESSAGE = 128 * 1024 * 1024


class MessageDecodeError(ValueError):
    """Bytes that are not a valid pipeline message."""


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _tuple_of_int(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@attrs.frozen
class RequestMeta:
    """What every stage needs to know about a request: sampling, limits, route, requester.

    `route` lists the peer ids of the stages in pipeline order; `reply_to` is the client's
    peer id (token chunks are published for it, failures are sent to it); `chunks` is how
    the token chunks reach it: "topic" or "direct" (see the module docstring).
    `head_split` > 0: the last stage computes the logits of vocabulary rows
    `0 .. head_split - 1` and the first stage the rest (see the module docstring).
    `resume_of`: the wire id of the attempt this one resumes, when the plan handed the lost
    stage's layers to a neighbour: the stages take over that attempt's KV caches and rebuild
    only the layers they gained (`inference_glue.kv_handoff`) instead of replaying everything.
    """

    KIND: ClassVar[str] = "meta"

    request_id: str
    max_tokens: int
    temp: float
    top_p: float
    seed: int | None
    prefill_step_size: int
    route: tuple[str, ...] = attrs.field(converter=_tuple_of_str)
    reply_to: str
    chunks: str = "topic"
    epoch: int = 0
    resume: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_int)
    head_split: int = 0
    resume_of: str = ""

    def __attrs_post_init__(self) -> None:
        if len(self.resume) >= self.max_tokens:
            raise ValueError(
                f"resuming after {len(self.resume)} tokens of a {self.max_tokens}-token request"
            )
        if self.chunks not in CHUNK_DELIVERY:
            raise ValueError(f"chunks must be one of {CHUNK_DELIVERY}, got {self.chunks!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")
        if not self.route:
            raise ValueError("the route names no stage")
        if self.resume_of and not self.resume:
            raise ValueError("resume_of names an attempt, but there are no tokens to resume")
        if self.head_split < 0 or (self.head_split and len(self.route) < 2):
            raise ValueError(
                f"head_split {self.head_split} needs a route of 2 or more stages and >= 0"
            )


@attrs.frozen
class GenerateRequest:
    """A new request, from a client to the first stage."""

    KIND: ClassVar[str] = "request"

    meta: RequestMeta
    prompt_ids: tuple[int, ...] = attrs.field(converter=_tuple_of_int)

    def __attrs_post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt has no tokens")


@attrs.frozen
class Activation:
    """Stage i's output for tokens `position .. position + L - 1` of a request.

    `tensor` is `tensor_codec.encode_tensor` bytes (dtype and shape kept, xxh3-64 checksum).
    `sample`: the next stage (if last) samples a token from these logits; otherwise this is a
    prefill piece whose output only fills the KV caches. `meta` comes with a request's first
    activation only. `steps`: the L positions are L decode steps of a resumed request's
    replay, to be run one at a time (`inference_glue.replay`); `sample` then concerns the
    last of them.
    """

    KIND: ClassVar[str] = "act"

    request_id: str
    position: int
    sample: bool
    tensor: bytes
    meta: RequestMeta | None = None
    steps: bool = False


@attrs.frozen
class TokenFeedback:
    """The token sampled at sequence `position`, back to the first stage; `done` ends it."""

    KIND: ClassVar[str] = "token"

    request_id: str
    position: int
    token_id: int
    done: bool


@attrs.frozen
class HeadShare:
    """The last stage's final (normed) hidden state for tokens `position ..` of a request,
    to the first stage, which computes the logits of vocabulary rows `row_start ..` and
    answers with `HeadPart`. `tensor`: `encode_tensor` bytes, as in `Activation`."""

    KIND: ClassVar[str] = "head?"

    request_id: str
    position: int
    row_start: int
    tensor: bytes


@attrs.frozen
class HeadPart:
    """The first stage's logits of rows `row_start ..` at the last of the positions of the
    `HeadShare` it answers (the only ones sampled), as `encode_tensor` bytes."""

    KIND: ClassVar[str] = "head"

    request_id: str
    position: int
    row_start: int
    tensor: bytes


@attrs.frozen
class Release:
    """Drop the request's KV caches (it finished or failed)."""

    KIND: ClassVar[str] = "release"

    request_id: str
    reason: str


@attrs.frozen
class Failure:
    """A stage could not serve a request; sent to the requester.

    `kind` is one of `FAILURE_KINDS`; for "corrupt", `suspect` is the peer whose hidden
    state failed its checksum (the client counts these per peer to quarantine it); for
    "lost", the peer a message of the request was lost to or from (`link_watch`).
    """

    KIND: ClassVar[str] = "failure"

    request_id: str
    stage: int
    peer: str
    message: str
    kind: str = "error"
    suspect: str = ""

    def __attrs_post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind must be one of {FAILURE_KINDS}, got {self.kind!r}")


@attrs.frozen
class Reconfigure:
    """Serve layers `layer_start .. layer_stop - 1` as stage `stage` of `num_stages` under
    plan `epoch`; drops every request in flight. Answered with `InfoReply` (same `nonce`),
    whose `error` says why a node could not (e.g. the layers exceed its memory budget)."""

    KIND: ClassVar[str] = "reconfigure"

    nonce: int
    epoch: int
    stage: int
    num_stages: int
    layer_start: int
    layer_stop: int


@attrs.frozen
class InfoQuery:
    """Ask a node what it serves; answered with `InfoReply` carrying the same `nonce`."""

    KIND: ClassVar[str] = "info?"

    nonce: int


@attrs.frozen
class InfoReply:
    """What a stage node serves: its layers of which model, and how it computes.

    `memory_budget` is the bytes of weights the node may hold (placement respects it);
    `epoch` its current plan; `error` is set when it answers a `Reconfigure` it could not do.
    `kv_handoff`: its model's KV caches can be taken over by a resumed request (they can be
    cut back at any length, `kv_kinds`); a hand-off is planned only when every stage says so.
    """

    KIND: ClassVar[str] = "info"

    nonce: int
    node_id: str
    stage: int
    num_stages: int
    layer_start: int
    layer_stop: int
    num_layers: int
    model: str
    model_fingerprint: str
    blas: str
    blas_threads: str | None
    pid: int
    epoch: int = 0
    memory_budget: int = 0
    error: str = ""
    load_seconds: float = 0.0
    kv_handoff: bool = False


@attrs.frozen
class SetFaults:
    """Fault injection for chaos runs: the node's fault shim takes `faults` (FaultConfig
    text, "" for none) and cuts every frame to and from the peers in `partition`. Obeyed
    only by nodes started with `--allow-fault-control`; answered with `InfoReply`."""

    KIND: ClassVar[str] = "faults"

    nonce: int
    faults: str
    partition: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)


@attrs.frozen
class StatsQuery:
    """Ask a node for its counters; answered with `StatsReply` carrying the same `nonce`."""

    KIND: ClassVar[str] = "stats?"

    nonce: int


@attrs.frozen
class StatsReply:
    """A node's counters: protocol totals, fault shim, per-peer health, its own work."""

    KIND: ClassVar[str] = "stats"

    nonce: int
    node_id: str
    stage: int
    protocol: dict[str, int]
    shim: dict[str, int]
    peers: dict[str, dict[str, Any]]
    work: dict[str, Any]


Message: TypeAlias = (
    GenerateRequest
    | Activation
    | TokenFeedback
    | HeadShare
    | HeadPart
    | Release
    | Failure
    | Reconfigure
    | SetFaults
    | InfoQuery
    | InfoReply
    | StatsQuery
    | StatsReply
)

_TYPES: dict[str, type[Any]] = {
    cls.KIND: cls
    for cls in (
        GenerateRequest,
        Activation,
        TokenFeedback,
        HeadShare,
        HeadPart,
        Release,
        Failure,
        Reconfigure,
        SetFaults,
        InfoQuery,
        InfoReply,
        StatsQuery,
        StatsReply,
    )
}


def _fields(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in attrs.fields(type(message)):
        value = getattr(message, field.name)
        if isinstance(value, RequestMeta):
            value = attrs.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def encode_message(message: Message) -> bytes:
    """msgpack `[kind, fields]`."""
    packed: bytes = msgpack.packb([message.KIND, _fields(message)], use_bin_type=True)
    return packed


def decode_message(data: bytes) -> Message:
    """Decode `encode_message` output; raises `MessageDecodeError` for anything else.

    Every field is checked against its type, nested ones included, by the project's one
    strict schema converter (`p2p_reliable.schema`), then by the class's own checks."""
    try:
        kind, fields = schema.decode(data, tuple[str, dict[str, Any]], max_bytes=MAX_MESSAGE)
    except schema.SchemaError as exc:
        raise MessageDecodeError(f"not a pipeline message: {exc}") from None
    cls = _TYPES.get(kind)
    if cls is None:
        raise MessageDecodeError(f"unknown pipeline message kind {kind!r}")
    try:
        message: Message = schema.structure(fields, cls)
    except schema.SchemaError as exc:
        raise MessageDecodeError(f"bad {kind!r} message: {exc}") from None
    return message
