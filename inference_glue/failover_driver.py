"""The client's failover driver: it notices what breaks a request (a stage lost, a corrupting
peer, a stale plan, the protocol giving up), has the plan redone over the nodes left
(`inference_glue.planner`) and gets the request resumed where its stream stopped.

`PipelineClient` owns one and asks it at each turn of a stream (`delivered`, `trouble`,
`failover`); the rules themselves (policy, planning, quarantine, records) are in
`inference_glue.failover`.

Detection is by events: a closed connection, a stage's `Failure`, a protocol verdict (`Gap`,
`Unrecoverable`) wake the stream at once. Only a hung stage (its connection open, silent) is
found by time: phi accrual makes it a suspect, read at most every `health_interval`, once no
token has come for `hang_after`; a probe it does not answer confirms it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from inference_glue.failover import (
    FailoverPolicy,
    Recovery,
)
from inference_glue.failover import now as clock
from inference_glue.messages import (
    CHUNK_STREAM,
    TOKENS,
    Failure,
    InfoQuery,
    RequestMeta,
)
from inference_glue.plan import StageFailedError
from inference_glue.planner import Planner
from inference_glue.stream_checks import raise_incomplete
from inference_glue.tokens import TokenChunk, TokenStreamAssembler
from p2p_reliable import Gap, Unrecoverable
from router import RouterLike

__all__ = ["FailoverDriver", "StreamWatch"]

log = logging.getLogger("p2pr.inference.client")

CHUNK_STREAMS = (TOKENS.topic, CHUNK_STREAM)


class StreamWatch:
    """One request's stream as the driver follows it: its attempts, the protocol verdicts
    already seen, when a token last came, and the recovery in progress."""

    def __init__(self, router: RouterLike) -> None:
        self.router = router
        self.attempt = 0
        self.recovery: Recovery | None = None
        self.known_events: set[int] = set()
        self.progress = 0.0
        # A stage could not take over the KV caches: resume with a full replay from now on.
        self.full_replay = False
        self.restart()

    def restart(self) -> None:
        """A new attempt starts now: older verdicts are not its own."""
        self.known_events = {id(e) for e in self.router.protocol_events}
        self.progress = time.monotonic()


class FailoverDriver:
    """Follows a client's streams and fails them over (see the module docstring).

    Args:
        router: the client's running router.
        planner: the client's plan.
        policy: how to react to failures.
        release: asks the stages of a request's route to drop it.
    """

    def __init__(
        self,
        router: RouterLike,
        planner: Planner,
        policy: FailoverPolicy,
        release: Callable[[RequestMeta, str], Awaitable[None]],
    ) -> None:
        self.router = router
        self.planner = planner
        self.policy = policy
        self._release = release
        self.recoveries: list[Recovery] = []
        self._health_read = 0.0

    def delivered(
        self, watch: StreamWatch, ready: list[TokenChunk], route: Sequence[str]
    ) -> list[TokenChunk]:
        """A chunk came: good data came through `route`; the chunks now complete."""
        watch.progress = time.monotonic()
        if ready:
            self.planner.corruption.progress(route)
            if watch.recovery is not None and watch.recovery.first_token_at is None:
                watch.recovery.first_token_at = clock()
        return ready

    async def trouble(
        self,
        watch: StreamWatch,
        item: Failure | None,
        meta: RequestMeta,
        assembler: TokenStreamAssembler,
        idle_timeout: float,
    ) -> tuple[str, set[str]] | None:
        """What the stream was woken for (a stage's `Failure`, a connection event, a verdict,
        or time): None to go on, or the reason and the peers to exclude when the request
        fails over. Raises when it cannot: `StageFailedError`, `TokenStreamError`."""
        trouble: tuple[str, set[str]] | None
        if isinstance(item, Failure):
            if item.request_id != meta.request_id:
                return None  # of an attempt given up already
            if item.kind == "rebuild":
                watch.full_replay = True
            if item.kind == "lost":
                trouble = await self._link_trouble(item, meta.route)
            else:
                trouble = self._failure_trouble(item)
            if item.kind == "stale" and meta.epoch == self.planner.epoch:
                self.planner.plan_broken = True  # a node of the current plan is not on it
        else:
            trouble = await self._lost_stages(meta.route, watch.progress)
            if trouble is None:
                reason, retry = self._stream_trouble(meta.route, watch, idle_timeout)
                if reason is not None:
                    trouble = (reason, set()) if retry else None
                    if not retry or not self.policy.enabled:
                        raise_incomplete(assembler, reason)
        if trouble is None:
            return None
        if not self.policy.enabled or watch.attempt >= self.policy.max_attempts:
            if isinstance(item, Failure):
                raise StageFailedError(item)
            raise_incomplete(assembler, trouble[0])
        watch.attempt += 1
        return trouble

    def _failure_trouble(self, failure: Failure) -> tuple[str, set[str]]:
        """What a stage's `Failure` means for failover: (reason, peers to exclude).

        Raises `StageFailedError` for failures that another attempt would only repeat."""
        if failure.kind == "stale":
            return f"stage {failure.stage} is on another plan: {failure.message}", set()
        if failure.kind == "rebuild":
            return f"stage {failure.stage}: {failure.message}; replaying in full", set()
        if failure.kind != "corrupt" or not failure.suspect:
            raise StageFailedError(failure)
        peer = failure.suspect
        stage = self.planner.stage_of(peer)
        count = self.planner.corruption.counts.get(peer, 0) + 1
        self.planner.event(peer, "corrupt", f"#{count} in a row: {failure.message}")
        if self.planner.corruption.corrupt(peer):
            self.planner.event(
                peer,
                "quarantined",
                f"after {count} consecutive corrupt hidden states (limit "
                f"{self.planner.corruption.limit}); its layers move to other nodes",
                stage,
            )
            return f"quarantined {peer} (stage {stage}) for corrupt hidden states", {peer}
        return f"corrupt hidden state from {peer} (stage {stage}); retrying", set()

    async def _link_trouble(self, failure: Failure, route: Sequence[str]) -> tuple[str, set[str]]:
        """A stage lost a message to or from `failure.suspect`: that stage is lost if its
        connection closed or it does not answer a probe (it died or hung; the stage saw it
        first), else the link broke for a moment and the request resumes on the same plan."""
        said = f"stage {failure.stage}: {failure.message}"
        peer = failure.suspect
        if peer not in route:
            return f"{said}; resuming", set()  # a message to or from the requester: us
        if peer not in self.router.connected:
            return self._lost({peer}, f"connection closed ({said})")
        if await self._silent({peer}):
            timeout = self.policy.probe_timeout
            return self._lost({peer}, f"no answer to a probe in {timeout:.0f} s ({said})")
        label = self._labels({peer})
        return f"{said}; {label} answers: resuming on the same plan", set()

    async def _lost_stages(
        self, route: Sequence[str], progress: float
    ) -> tuple[str, set[str]] | None:
        """Stages of `route` that are gone, or None when all are there.

        A closed connection (a killed process) is enough. Phi accrual alone is not: under
        heavy loss heartbeats go missing too. A stage whose health says dead while no token
        has come for `hang_after` seconds gets a probe (`InfoQuery`, carried reliably); only
        a stage that does not answer it within `probe_timeout` is lost (a hung process)."""
        policy = self.policy
        lost = {peer for peer in route if peer not in self.router.connected}
        why = "connection closed"
        if not lost:
            if clock() - self._health_read < policy.health_interval:
                return None
            if time.monotonic() - progress < policy.hang_after:
                return None
            self._health_read = clock()
            rows = await self.router.health()
            dead = {
                str(r["peer"]) for r in rows if r.get("peer") in route and r.get("state") == "DEAD"
            }
            if not dead:
                return None
            lost = await self._silent(dead)
            why = f"no heartbeat (phi accrual) and no answer to a probe in {policy.probe_timeout:.0f} s"
            if not lost:
                return None
        return self._lost(lost, why)

    async def _silent(self, peers: set[str]) -> set[str]:
        """Those of `peers` that do not answer a probe (`InfoQuery`) within `probe_timeout`."""
        asks = {p: InfoQuery for p in sorted(peers)}
        replies = await self.planner.rpc.ask(asks, self.policy.probe_timeout)
        return {p for p in peers if replies.get(p) is None}

    def _labels(self, peers: set[str]) -> str:
        return ", ".join(f"stage {self.planner.stage_of(p)} ({p})" for p in sorted(peers))

    def _lost(self, peers: set[str], why: str) -> tuple[str, set[str]]:
        return f"lost {self._labels(peers)}: {why}", peers

    def _stream_trouble(
        self, route: Sequence[str], watch: StreamWatch, idle_timeout: float
    ) -> tuple[str | None, bool]:
        """Why the current stream cannot complete (None while it still may), and whether
        another attempt could help."""
        last = self.planner.stages[-1].node_id
        for event in list(self.router.protocol_events):
            if id(event) in watch.known_events:
                continue
            if isinstance(event, Gap) and event.origin == last and event.stream in CHUNK_STREAMS:
                return f"the protocol reported a gap in the token chunks from {last}: {event}", True
            if isinstance(event, Unrecoverable) and event.peer in route:
                return f"the protocol gave up on a message: {event}", True
        if time.monotonic() - watch.progress > idle_timeout:
            return f"no token chunk for {idle_timeout:.0f} s", False
        return None, False

    async def failover(
        self,
        watch: StreamWatch,
        meta: RequestMeta,
        assembler: TokenStreamAssembler,
        trouble: tuple[str, set[str]],
        key: str,
    ) -> Recovery:
        """Stop the failed attempt, re-plan over the nodes left, and get the assembler ready
        for the next attempt, whose wire id is `key`; returns the record of this recovery."""
        reason, lost = trouble
        recovery = Recovery(meta.request_id, watch.attempt, reason, tuple(sorted(lost)), clock())
        self.recoveries.append(recovery)
        self.planner.notify()
        watch.recovery = recovery
        for peer in lost:
            self.planner.lose(peer, reason)
        log.warning(
            "request %r: %s; failing over (attempt %d)", meta.request_id, reason, watch.attempt
        )
        await self._release(meta, f"failover: {reason}")
        # One re-plan at a time: requests in flight together all notice a lost node, and the
        # first to get here re-plans for all of them; the others resume on its plan.
        async with self.planner.plan_lock:
            if lost & {s.node_id for s in self.planner.stages} or self.planner.plan_broken:
                # One stage lost: its layers may go to a neighbour, the others keep theirs.
                await self.planner.replan(reason, next(iter(lost)) if len(lost) == 1 else None)
        recovery.replanned_at = clock()
        recovery.resumed_from = assembler.rekey(key)
        assembler.source = self.planner.stages[-1].label
        recovery.route = tuple(s.node_id for s in self.planner.stages)
        recovery.handoff = (
            self.planner.handoff == (meta.epoch, self.planner.epoch) and not watch.full_replay
        )
        recovery.layers = tuple((s.layers.start, s.layers.stop) for s in self.planner.stages)
        return recovery
