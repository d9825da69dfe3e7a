"""What a stage node keeps of a request after dropping it, so that a resumed attempt can take
it over (`inference_glue.kv_handoff`): its KV caches by layer, and the log of the hidden
states it sent on (the inputs of the next stage's first layer).

Why: when a stage dies, the client hands its layers to a neighbour (`handoff_plan`); the
other stages' caches are still right, and the neighbour can rebuild the layers it gained
from its own log (or from the tokens, for the model's first layers) without the pipeline
replaying every delivered token.

Bounded everywhere: at most `max_parked` dropped requests are kept (the oldest goes first),
each request's log holds at most `log_bytes` and all logs together `total_log_bytes`. A log
that would grow past its bound is given up (`overflowed`): a resumed attempt that needs it
then fails with kind "rebuild" and the client resumes with a full replay instead. With
`max_parked` 0 (a model whose caches cannot be cut back, `kv_kinds`: no hand-off is ever
planned for it) nothing is logged or parked. No MLX and no network here; the caches are
opaque objects.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs

__all__ = ["LOG_BYTES", "MAX_PARKED", "TOTAL_LOG_BYTES", "KvParking", "Parked", "SentHidden"]

# Requests dropped at a failover wait here for their resumed attempts: room for several.
MAX_PARKED = 8
# A 1,000-token answer of a model with a hidden size of 4096 in float32 logs 16 MB.
LOG_BYTES = 64 * 1024 * 1024
TOTAL_LOG_BYTES = 256 * 1024 * 1024


@attrs.frozen
class SentHidden:
    """A hidden state this stage sent on: positions from `position`, as one forward or (with
    `steps`) as one decode step per position; `tensor` is its codec bytes."""

    position: int
    steps: bool
    tensor: bytes


@attrs.define
class SendLog:
    """A request's sent hidden states, in order."""

    entries: list[SentHidden] = attrs.field(factory=list)
    size: int = 0
    overflowed: bool = False


@attrs.define
class Parked:
    """A dropped request: its KV caches by model layer, its send log, and its requester."""

    caches: dict[int, Any]
    log: SendLog
    owner: str = ""


class KvParking:
    """The send logs of requests in flight and the parked state of dropped ones."""

    def __init__(
        self,
        max_parked: int = MAX_PARKED,
        log_bytes: int = LOG_BYTES,
        total_log_bytes: int = TOTAL_LOG_BYTES,
    ) -> None:
        self.max_parked = max_parked
        self.log_bytes = log_bytes
        self.total_log_bytes = total_log_bytes
        self._logs: dict[str, SendLog] = {}
        self._parked: OrderedDict[str, Parked] = OrderedDict()
        self._total = 0
        self.overflows = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parked

    @property
    def logged_bytes(self) -> int:
        """Bytes held by every log, parked ones included."""
        return self._total

    def record(self, request_id: str, sent: SentHidden) -> None:
        """Log a hidden state sent for `request_id` (given up past the bounds)."""
        if not self.max_parked:
            return  # nothing is ever parked: a log would only hold memory
        log = self._logs.setdefault(request_id, SendLog())
        if log.overflowed:
            return
        size = len(sent.tensor)
        if log.size + size > self.log_bytes or self._total + size > self.total_log_bytes:
            self._clear(log)
            log.overflowed = True
            self.overflows += 1
            return
        log.entries.append(sent)
        log.size += size
        self._total += size

    def continue_log(self, request_id: str, old: SendLog, before: int) -> None:
        """A resumed request's log starts with its previous attempt's, up to `before`."""
        if request_id in self._logs:
            raise ValueError(f"request {request_id!r} already has a send log")
        kept = [e for e in old.entries if e.position < before]
        self._logs[request_id] = SendLog(overflowed=old.overflowed)
        for entry in kept:
            self.record(request_id, entry)

    def park(self, request_id: str, caches: dict[int, Any], owner: str) -> None:
        """`request_id` of requester `owner` was dropped: keep its caches and log (the
        oldest parked goes)."""
        log = self._logs.pop(request_id, SendLog())
        if not self.max_parked or (not caches and not log.entries):
            return
        old = self._parked.pop(request_id, None)
        if old is not None:
            self._clear(old.log)
        self._parked[request_id] = Parked(caches, log, owner)
        while len(self._parked) > self.max_parked:
            _, evicted = self._parked.popitem(last=False)
            self._clear(evicted.log)

    def take(self, request_id: str, owner: str) -> Parked | None:
        """The parked state of `request_id`, now the caller's: None if none is kept, or if
        it was another requester's (whose context must not leak into this one's answer)."""
        parked = self._parked.get(request_id)
        if parked is None or parked.owner != owner:
            return None
        del self._parked[request_id]
        self._total -= parked.log.size
        return parked

    def discard(self, request_id: str) -> None:
        """`request_id` finished: nothing of it is kept."""
        log = self._logs.pop(request_id, None)
        if log is not None:
            self._clear(log)
        parked = self._parked.pop(request_id, None)
        if parked is not None:
            self._clear(parked.log)

    def _clear(self, log: SendLog) -> None:
        self._total -= log.size
        log.entries.clear()
        log.size = 0
