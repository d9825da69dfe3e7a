"""The requests in flight at one stage node: their states, and the first stage's round trips."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from inference_glue.kv_parking import KvParking
from inference_glue.messages import RequestMeta
from inference_glue.stage_compute import RequestState

__all__ = ["StageRequests"]


class StageRequests:
    """Request states by id. Dropping one also takes its KV caches from the stage
    (`take_caches`) and parks them with its send log (`parking`), for a resumed attempt to
    take over; so a request is never forgotten with its caches still held."""

    def __init__(self, take_caches: Callable[[str], dict[int, Any]], parking: KvParking) -> None:
        self._take_caches = take_caches
        self._parking = parking
        self._states: dict[str, RequestState] = {}
        # When the first stage sent a step whose token is still to come back.
        self._sent_at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._states))

    def metas(self) -> list[RequestMeta]:
        return [state.meta for state in self._states.values()]

    def get(self, request_id: str) -> RequestState | None:
        return self._states.get(request_id)

    def add(self, state: RequestState) -> RequestState:
        rid = state.meta.request_id
        if rid in self._states:
            raise ValueError(f"request id {rid!r} is already in flight")
        self._states[rid] = state
        return state

    def sent(self, request_id: str, now: float) -> None:
        self._sent_at[request_id] = now

    def returned(self, request_id: str, now: float) -> float | None:
        """Seconds since `sent`, or None if no step of the request was waiting."""
        sent = self._sent_at.pop(request_id, None)
        return None if sent is None else now - sent

    def drop(self, request_id: str) -> RequestState | None:
        """Forget the request and park its caches; its state, if it was in flight."""
        self._sent_at.pop(request_id, None)
        state = self._states.pop(request_id, None)
        owner = state.meta.reply_to if state is not None else ""
        self._parking.park(request_id, self._take_caches(request_id), owner)
        return state

    def drop_all(self) -> None:
        for rid in list(self._states):
            self.drop(rid)
