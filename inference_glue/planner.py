"""The plan of a client's pipeline (its stages and epoch) and its upkeep.

A plan places the model's layers over the stage nodes that may serve (`inference_glue.roster`
says which), in proportion to their memory budgets (`failover.plan_stages`), and is put in
place by a `Reconfigure` to each node under a new epoch. Between requests the plan follows
the nodes: a node that returns, restarts or joins is planned in again (in its old place), a
node gone is planned out; never while a request is in flight (its end looks again). A
failover re-plans at once (`FailoverDriver`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from discovery.health import HealthView
from inference_glue.failover import (
    CorruptionTracker,
    FailoverPolicy,
    NodeOffer,
    PeerEvent,
    plan_stages,
)
from inference_glue.footprint import ModelDoesNotFitError, ModelFootprint
from inference_glue.handoff_plan import hand_off_plan
from inference_glue.messages import (
    CONTROL_STREAM,
    TOKENS,
    InfoQuery,
    InfoReply,
    Message,
    Reconfigure,
    Release,
    RequestMeta,
    encode_message,
)
from inference_glue.plan import PipelineError, StageInfo, check_pipeline, check_pipeline_models
from inference_glue.roster import Roster
from inference_glue.rpc import RequestReply
from router import RouterLike

__all__ = ["Planner"]

log = logging.getLogger("p2pr.inference.client")


class Planner:
    """A client's plan and what keeps it in step with the nodes.

    Args:
        router: the client's running router.
        rpc: the client's request/reply helper (`InfoQuery`, `Reconfigure`).
        footprint: the model's layer sizes (None: no re-planning).
        policy: failover settings (whether to re-plan, timeouts, quarantine).
        notify: wakes the client's waiters (a new plan).
        follow_views: start following the stage nodes' health views (a node was lost).
    """

    def __init__(
        self,
        router: RouterLike,
        rpc: RequestReply,
        footprint: ModelFootprint | None,
        policy: FailoverPolicy,
        *,
        notify: Callable[[], None],
        follow_views: Callable[[], None],
    ) -> None:
        self.router = router
        self.rpc = rpc
        self.footprint = footprint
        self.policy = policy
        self._notify = notify
        self._follow_views = follow_views
        self.stages: list[StageInfo] = []
        self.epoch = 0
        self.corruption = CorruptionTracker(policy.max_corrupt)
        self.roster = Roster(router.node_id)
        self.roster.quarantined = self.corruption.quarantined
        self.events: list[PeerEvent] = []
        self.plan_lock = anyio.Lock()
        self._ask_lock = anyio.Lock()
        self._active = 0  # requests in flight: the plan changes only when there are none
        self._plan_due = anyio.Event()  # set: see whether the plan should change
        self._gone: set[str] = set()  # nodes whose loss was reported, until they connect again
        self.plan_broken = False  # a re-plan failed half-way: re-plan before the next use
        # (from epoch, to epoch) when the current plan handed a lost stage's layers to a
        # neighbour: requests of the old epoch resume by taking over their KV caches.
        self.handoff: tuple[int, int] | None = None

    @property
    def excluded(self) -> set[str]:
        """Nodes not to be planned now: quarantined, refusing, or lost and not back."""
        return self.roster.excluded

    def set_stages(self, stages: Sequence[StageInfo]) -> None:
        """`stages` form the pipeline now."""
        self.stages = list(stages)
        self.roster.rank(s.node_id for s in self.stages)
        self._notify()

    def notify(self) -> None:
        """Wake what waits on the client (`PipelineClient.wait_until`): something changed."""
        self._notify()

    def stage_of(self, peer: str) -> int | None:
        """The stage index `peer` serves in the plan, if any."""
        return next((s.index for s in self.stages if s.node_id == peer), None)

    def event(self, peer: str, kind: str, detail: str, stage: int | None = None) -> None:
        """Record (and log) something noticed about a node."""
        stage = self.stage_of(peer) if stage is None else stage
        event = PeerEvent(time.time(), peer, stage, kind, detail)
        self.events.append(event)
        log.warning("%s", event.line())

    def lose(self, peer: str, reason: str) -> None:
        """Give up on `peer` for now: while its connection stays open (no answer to a probe)
        until it answers; else until it connects again. Reported once per loss."""
        self.roster.lose(peer, peer in self.router.connected)
        self._follow_views()
        if peer not in self._gone and peer not in self.corruption.quarantined:
            self._gone.add(peer)
            self.event(peer, "lost", reason)

    # -- between requests ------------------------------------------------------------------

    def on_connection(self, peer: str, connected: bool) -> None:
        """A connection opened or closed: the plan is looked at again."""
        if not connected:
            self.roster.disconnected(peer)
            if peer in {s.node_id for s in self.stages}:
                self._follow_views()
        elif peer in self._gone:
            self._gone.discard(peer)
            if peer not in self.excluded:
                self.event(peer, "returned", "connected again; planned between requests")
        self._plan_due.set()

    def heard_view(self, view: HealthView) -> None:
        """A stage node's health view arrived."""
        if view.role == "stage" and self.roster.claims_stage(view.node_id):
            self._plan_due.set()  # a node that did not answer in time says it serves

    async def keep_plan(self) -> None:
        """Between requests, re-plan when the usable nodes change (until cancelled)."""
        while True:
            await self._plan_due.wait()
            self._plan_due = anyio.Event()
            try:
                await self.classify()
                async with self.plan_lock:
                    await self.replan_if_better()
            except Exception as exc:  # the next event tries again; requests report their own
                log.warning("the pipeline could not be re-planned: %s", exc)

    async def classify(self) -> None:
        """Ask the connected peers that were never asked (or are lost, or came back) what
        they serve."""
        if not self.policy.enabled or not self.stages:
            return
        async with self._ask_lock:
            peers = self.roster.to_ask(self.router.connected)
            if peers:
                asks = {p: InfoQuery for p in peers}
                replies = await self.rpc.ask(asks, self.policy.query_timeout)
                for peer in peers:
                    self.judge(peer, replies.get(peer), mark_silent=True)

    async def replan_if_better(self) -> bool:
        """Re-plan (with the plan lock held) when the nodes a plan would use now differ from
        the plan's: a node returned, restarted, joined or left. Never while a request is in
        flight (its end looks again). True if the plan changed."""
        if not self.policy.enabled or self.footprint is None or not self.stages or self._active:
            return False
        connected = self.router.connected
        current = {s.node_id for s in self.stages}
        budgets = self.roster.budgets
        offers = [NodeOffer(p, budgets[p] or (1 << 40)) for p in self.roster.usable(connected)]
        try:
            target = {node for node, _ in plan_stages(self.footprint, offers)}
        except ModelDoesNotFitError:
            if current <= connected:
                return False  # what serves now still does
            target = set()
        if target == current and current <= connected and not self.plan_broken:
            return False
        for peer in sorted(current - connected):
            self.lose(peer, "its connection closed between requests")
        back = ", ".join(sorted(target - current)) or "none"
        await self.replan(f"nodes to use changed (new or back: {back})")
        return True

    async def rebalance(self) -> bool:
        """Bring nodes that joined or returned since the last plan into the pipeline now."""
        await self.classify()
        async with self.plan_lock:
            return await self.replan_if_better()

    # -- a request -------------------------------------------------------------------------

    async def begin(self, make_meta: Callable[[], RequestMeta]) -> RequestMeta:
        """A request starts: nodes that returned or joined are brought into the plan first
        (never while another request is in flight); its `RequestMeta` on that plan."""
        await self.classify()
        async with self.plan_lock:
            await self.replan_if_better()
            meta = make_meta()
            self._active += 1
        return meta

    def end(self) -> None:
        """A request ended: what changed meanwhile may now be acted on."""
        self._active -= 1
        if not self._active:
            self._plan_due.set()

    # -- planning --------------------------------------------------------------------------

    async def replan(self, reason: str, lost: str | None = None) -> None:
        """Plan the layers over every reachable node not excluded, have them load their
        layers, and make that the pipeline (`stages`, `epoch`). When the stage `lost` was
        lost, first try the plan that hands its layers to a neighbour (`handoff_plan`):
        then `handoff` says from which epoch to which the caches may be taken over.

        Raises:
            ModelDoesNotFitError: the nodes left cannot hold the model (at once).
            PipelineError: no plan could be put in place.
        """
        if self.footprint is None:
            raise PipelineError(f"{reason}; cannot re-plan without the model's layer sizes")
        # Until a plan is in place, some nodes may hold a newer epoch than `self.stages`.
        self.plan_broken = True
        self.handoff = None
        old, old_epoch = list(self.stages), self.epoch
        for attempt in range(3):
            offers = await self._offers()
            plan = None
            if lost is not None and attempt == 0:
                plan = hand_off_plan(old, lost, offers, self.footprint)
            handed_off = plan is not None
            plan = plan or plan_stages(self.footprint, offers)
            epoch = self.epoch + 1
            asks: dict[str, Callable[[int], Message]] = {
                node: functools.partial(
                    _reconfigure, epoch=epoch, stage=i, stages=len(plan), layers=layers
                )
                for i, (node, layers) in enumerate(plan)
            }
            replies = await self.rpc.ask(asks, self.policy.reconfigure_timeout)
            self.epoch = epoch
            if all(reply is not None and not reply.error for reply in replies.values()):
                self.handoff = (old_epoch, epoch) if handed_off else None
                await self._take_plan([StageInfo.from_reply(replies[node]) for node, _ in plan])
                return
            for node, reply in replies.items():
                if reply is None:
                    # Gone (back when it connects again) or hung (back when it answers).
                    self.lose(node, f"no answer to the plan of epoch {epoch}")
                elif reply.error:
                    self.roster.refused.add(node)
                    self.event(node, "refused", f"epoch {epoch}: {reply.error}")
        raise PipelineError(f"{reason}; no new plan could be put in place after 3 tries")

    async def _take_plan(self, stages: list[StageInfo]) -> None:
        self.plan_broken = False
        self.set_stages(stages)
        layout = ", ".join(
            f"{s.node_id[-6:]}: {s.layers.start}-{s.layers.stop - 1}" for s in self.stages
        )
        for s in self.stages:
            self.event(s.node_id, "reconfigured", f"epoch {self.epoch}: {layout}", s.index)
        if self.stages[-1].node_id not in self.router.subscribers(TOKENS.topic):
            with anyio.move_on_after(5):
                await self.await_last_stage(5)

    async def release(self, meta: RequestMeta, reason: str) -> None:
        """Ask every stage of `meta`'s route that is still there to drop the request."""
        payload = encode_message(Release(meta.request_id, reason))
        for peer in meta.route:
            if peer in self.router.connected and peer not in self.excluded:
                await self.router.send_to(peer, CONTROL_STREAM, payload)

    async def adopt(self, infos: Sequence[InfoReply]) -> None:
        """Make the pipeline the nodes describe (a client joining them) the plan: the nodes
        of the newest plan epoch, or, when those do not form a pipeline (a failover left it
        half done, or no node has layers yet: `p2pr serve` nodes wait for a plan), a new
        plan over all of them."""
        for info in infos:
            self.roster.served(info.node_id, info.memory_budget)
        self.epoch = max(i.epoch for i in infos)
        # After a failover the nodes of the newest plan form the pipeline; others are spares,
        # as are nodes that were never given layers (num_stages 0).
        current = [i for i in infos if i.epoch == self.epoch and i.num_stages > 0]
        try:
            self.set_stages(check_pipeline(current))
        except PipelineError:
            if not self.policy.enabled or self.footprint is None or len(current) == len(infos):
                raise
            check_pipeline_models(infos)
            self.set_stages([StageInfo.from_reply(i) for i in infos])
            reason = (
                "the nodes of the newest plan do not form a pipeline"
                if current
                else f"no plan yet: the model is placed over {len(infos)} node(s)"
            )
            async with self.plan_lock:
                await self.replan(reason)

    async def await_last_stage(self, timeout: float) -> None:
        """Wait until the last stage subscribes to the token topic; PipelineError after
        `timeout` seconds."""
        last = self.stages[-1]
        with anyio.move_on_after(timeout):
            await self.router.wait_for_subscriber(TOKENS.topic, last.node_id)
        if last.node_id not in self.router.subscribers(TOKENS.topic):
            raise PipelineError(
                f"the last stage, {last.label}, did not subscribe to {TOKENS.topic} "
                f"within {timeout:.0f} s"
            )

    async def _offers(self, grace: float = 0.3) -> list[NodeOffer]:
        """Every connected node that serves this model and may be planned, with its memory
        budget, in rank order (a node that returns takes its old place): the known stage
        nodes, and any connected peer never asked (a restarted or spare node), which gets
        only `grace` seconds once the others have answered, so that a peer that is no stage
        node (another client) does not slow a failover down."""
        connected = self.router.connected
        known = set(self.roster.usable(connected))
        known |= {s.node_id for s in self.stages if s.node_id in connected} - self.excluded
        new = [p for p in self.roster.to_ask(connected) if p not in known | self.roster.lost]
        peers = self.roster.ordered(known | set(new))
        replies = await self.rpc.ask(
            {p: InfoQuery for p in peers}, self.policy.query_timeout, optional=new, grace=grace
        )
        offers = []
        for peer in peers:
            budget = self.judge(peer, replies.get(peer), mark_silent=False)
            if budget is not None:
                offers.append(NodeOffer(peer, budget))
        if not offers:
            raise ModelDoesNotFitError("no node is left to hold the model")
        return offers

    def judge(self, peer: str, reply: Any, mark_silent: bool) -> int | None:
        """Record what `peer`'s answer to an InfoQuery says; its memory budget if it is a
        stage node of this pipeline's model."""
        if not isinstance(reply, InfoReply):
            if mark_silent:
                self.roster.no_answer(peer)
            return None
        model = self.stages[0] if self.stages else None
        if model is not None and (reply.model_fingerprint, reply.blas, reply.blas_threads) != (
            model.fingerprint,
            model.blas,
            model.blas_threads,
        ):
            self.roster.stranger(peer)
            if reply.model_fingerprint != model.fingerprint:
                self.event(
                    peer,
                    "stranger",
                    f"serves model files {reply.model} [{reply.model_fingerprint}], not this "
                    f"pipeline's {model.model} [{model.fingerprint}]: not planned in",
                )
            return None
        self.roster.served(peer, reply.memory_budget)
        # A new plan's epoch must be above every node's, spares' included.
        self.epoch = max(self.epoch, reply.epoch)
        return reply.memory_budget or (1 << 40)


def _reconfigure(nonce: int, *, epoch: int, stage: int, stages: int, layers: range) -> Reconfigure:
    return Reconfigure(nonce, epoch, stage, stages, layers.start, layers.stop)
