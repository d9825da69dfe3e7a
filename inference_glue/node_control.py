"""A stage node's control plane: what it serves (`InfoQuery`), its counters (`StatsQuery`),
fault settings for chaos runs (`SetFaults`), and a new plan (`Reconfigure`); and what it
tells others about a request: its release (`Release`) and its failure (`Failure`).

Queries are answered at once, off the compute path. `Release` and `Reconfigure` go through
the node's work queue, so that they never race a computation; a `Reconfigure` loads the new
layers from the node's own copy of the model (refusing, with a reason, layers beyond its
memory budget or a plan that is not newer) and answers with the node's `InfoReply`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import anyio
import attrs

from inference_glue.footprint import format_bytes
from inference_glue.messages import (
    CLIENT_STREAM,
    CONTROL_STREAM,
    TOKENS,
    Failure,
    InfoQuery,
    InfoReply,
    Reconfigure,
    Release,
    RequestMeta,
    SetFaults,
    StatsQuery,
    StatsReply,
    encode_message,
)
from inference_glue.node_inbox import Work
from inference_glue.rpc import reply
from inference_glue.stage import PipelineStage, check_stage, restage
from router import FaultConfig

if TYPE_CHECKING:
    from inference_glue.node import StageNode

__all__ = ["FINISHED", "StageControl"]

log = logging.getLogger("p2pr.inference.node")

# The reason of the `Release` the last stage sends when a request is done.
FINISHED = "finished"


class StageControl:
    """Answers a `StageNode`'s control messages (see the module docstring)."""

    def __init__(self, node: StageNode, allow_fault_control: bool = False) -> None:
        self.node = node
        self.allow_fault_control = allow_fault_control

    async def pump(self, work: anyio.abc.ObjectSendStream[Work]) -> None:
        """Read the control stream until cancelled."""
        node = self.node
        async with work:
            async for item in node.router.direct_receiver(CONTROL_STREAM):
                message = node.inbox.decode(item)
                if isinstance(message, Release | Reconfigure):
                    # Through the worker, so that it never races a computation.
                    await work.send(Work(item.stream, item.peer, message))
                elif isinstance(message, InfoQuery):
                    await reply(node.router, item.peer, self.info(message.nonce))
                elif isinstance(message, StatsQuery):
                    await reply(node.router, item.peer, await self.stats(message.nonce))
                elif isinstance(message, SetFaults):
                    await self._set_faults(message, item.peer)
                elif message is not None:
                    node.inbox.unexpected(item.peer, message, item.stream)

    async def release(self, peer: str, request_id: str, reason: str) -> None:
        """Tell `peer` (unless it is this node) to drop `request_id`."""
        if peer != self.node.router.node_id:
            payload = encode_message(Release(request_id, reason))
            await self.node.router.send_to(peer, CONTROL_STREAM, payload)

    async def abandon(self, meta: RequestMeta, when: str) -> None:
        """The requester of `meta` is not connected: stop the request everywhere. It may be
        away only for a moment (a connection cut and made again): told (kind "lost"), it
        resumes the request instead of waiting for tokens that will not come."""
        node = self.node
        node.counters.abandoned += 1
        log.info("%s: requester %s of %r is gone", node.name, meta.reply_to, meta.request_id)
        node.finish(meta.request_id)
        why = f"the requester was not connected {when}"
        failure = Failure(
            meta.request_id, node.index, node.router.node_id, why, "lost", meta.reply_to
        )
        await self.report_failure(failure, meta)

    async def report_failure(self, failure: Failure, meta: RequestMeta) -> None:
        """Tell the requester of `meta` which stage failed and why; release the request
        everywhere (bounded: a failing pipeline must not hold up the node's worker)."""
        with anyio.move_on_after(10):
            await self.node.router.send_to(meta.reply_to, CLIENT_STREAM, encode_message(failure))
            for peer in meta.route:
                await self.release(peer, failure.request_id, "failed")

    def info(self, nonce: int = 0) -> InfoReply:
        """What this node serves (no stage and no layers before its first plan)."""
        node = self.node
        layers = node.stage.layers if node.planned else range(0)
        return InfoReply(
            nonce=nonce,
            node_id=node.router.node_id,
            stage=node.index,
            num_stages=node.num_stages if node.planned else 0,
            layer_start=layers.start,
            layer_stop=layers.stop,
            num_layers=node.stage.num_model_layers,
            model=node.model,
            model_fingerprint=node.fingerprint,
            blas=node.blas.kind,
            blas_threads=node.blas.threads,
            pid=os.getpid(),
            epoch=node.epoch,
            memory_budget=node.memory_budget,
            kv_handoff=node.parking.max_parked > 0,
        )

    async def stats(self, nonce: int = 0) -> StatsReply:
        """This node's counters (the router's read on its engine loop)."""
        node = self.node
        snap = await node.router.counters(timeout=10.0)
        work = attrs.asdict(node.counters)
        work["in_flight"] = node.in_flight
        if node.compute.head_tuner is not None:
            work["head_split"] = node.compute.head_tuner.as_dict()
        work["bad_payloads"] = dict(node.router.bad_payloads)
        return StatsReply(
            nonce=nonce,
            node_id=node.router.node_id,
            stage=node.index,
            protocol=snap["protocol"],
            shim=snap["shim"],
            peers=snap["peers"],
            work=work,
        )

    async def _set_faults(self, message: SetFaults, peer: str) -> None:
        node = self.node
        error = ""
        if not self.allow_fault_control:
            error = "this node does not take fault settings (no --allow-fault-control)"
        else:
            try:
                node.router.set_faults(FaultConfig.parse(message.faults), message.partition)
            except (ValueError, RuntimeError) as exc:  # a bad setting; the router not running
                error = str(exc)
        if error:
            node.counters.bad_messages += 1
            log.warning("%s: fault settings from %s refused: %s", node.name, peer, error)
        else:
            log.warning(
                "%s: faults now %r, partitioned from %s",
                node.name,
                message.faults,
                list(message.partition),
            )
        await reply(node.router, peer, attrs.evolve(self.info(message.nonce), error=error))

    async def reconfigure(self, message: Reconfigure, peer: str) -> None:
        """Serve other layers under a new plan; answer with this node's `InfoReply`."""
        node = self.node
        layers = range(message.layer_start, message.layer_stop)
        start = time.perf_counter()
        error = ""
        try:
            stage = await self._load(message, layers)
            await self._take_plan(stage, message)
            log.warning(
                "%s: reconfigured for epoch %d: layers %d-%d in %.2f s",
                node.name,
                node.epoch,
                layers.start,
                layers.stop - 1,
                time.perf_counter() - start,
            )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: cannot reconfigure: %s", node.name, error)
        answer = attrs.evolve(
            self.info(message.nonce),
            error=error,
            load_seconds=round(time.perf_counter() - start, 3),
        )
        await reply(node.router, peer, answer)

    async def _take_plan(self, stage: PipelineStage, message: Reconfigure) -> None:
        """Serve `stage` as the message's stage under its plan epoch from now on."""
        node = self.node
        check_stage(stage, message.stage, message.num_stages)
        for rid in node.stage.request_ids:
            node.stage.release(rid)
        node.compute.stage = stage
        node.index, node.num_stages, node.epoch = message.stage, message.num_stages, message.epoch
        node.planned = True
        node.counters.reconfigurations += 1
        if node.stage.is_last and TOKENS.topic not in node.router.topic_routers:
            await node.router.register_topic(TOKENS)

    async def _load(self, message: Reconfigure, layers: range) -> PipelineStage:
        """The stage of the new plan, loaded (its requests in flight dropped), after
        checking that it may be: a model to load from, a newer epoch, enough memory."""
        node = self.node
        if node.model_dir is None or node.footprint is None:
            raise RuntimeError("this node was started without a model directory to reload")
        if not 0 <= message.stage < message.num_stages:
            raise ValueError(f"stage {message.stage} of {message.num_stages} does not exist")
        if message.epoch <= node.epoch:
            # A late or replayed plan must not take a node back to an older layout.
            raise ValueError(f"plan epoch {message.epoch} is not newer than {node.epoch}")
        need = node.footprint.stage_bytes(layers)
        if need > node.memory_budget:
            raise MemoryError(
                f"layers {layers.start}-{layers.stop - 1} need {format_bytes(need)}, more "
                f"than this node's memory budget of {format_bytes(node.memory_budget)}"
            )
        node.release_all()
        if node.planned and layers == node.stage.layers:
            return node.stage
        # Loaded before the old stage is let go: a node that cannot load keeps serving its
        # old layers (and says why), at the price of both in memory for a moment.
        stage: PipelineStage = await node.compute.run(restage, node.stage, node.model_dir, layers)
        return stage
