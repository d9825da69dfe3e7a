"""The split LM head across the first and last stages of a pipeline.

With tied embeddings the first stage holds the LM head's matrix anyway (for its lookup) and
would sit idle while the last stage computes the head; so the last stage sends it its final
hidden state (`HeadShare`), computes its own rows of the logits meanwhile, and samples once
the first stage's rows arrive (`HeadPart`). Logits computed by blocks of rows are the same
bit for bit, so the tokens are identical wherever the cut lies (`HeadSplitTuner` moves it).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from inference_glue.messages import HEAD_STREAM, HeadPart, HeadShare, RequestMeta, encode_message
from inference_glue.stage_compute import HeadShared

if TYPE_CHECKING:
    from inference_glue.node import StageNode

__all__ = ["HeadExchange"]

log = logging.getLogger("p2pr.inference.node")


class HeadExchange:
    """A stage node's side of the split head: the last stage's share, the first stage's
    part, and the last stage's joining of the two."""

    def __init__(self, node: StageNode) -> None:
        self.node = node

    async def share(self, meta: RequestMeta, out: HeadShared) -> None:
        """Last stage: send the first stage its share of the head."""
        share = HeadShare(meta.request_id, out.position, out.rows, out.hidden)
        await self.node.router.send_to(meta.route[0], HEAD_STREAM, encode_message(share))

    async def on_share(self, share: HeadShare, peer: str) -> None:
        """First stage: compute the asked part of the head and send it back."""
        state = self.node.request(share.request_id)
        if state is None:
            self.node.counters.stale_messages += 1
            log.info(
                "%s: head share for unknown request %r dropped", self.node.name, share.request_id
            )
            return
        if peer != state.meta.route[-1] or self.node.index != 0:
            raise ValueError(
                f"a head share from {peer}, which is not the last stage of {share.request_id!r}"
                f", or to stage {self.node.index}, which is not the first"
            )
        start = time.perf_counter()
        part = await self.node.compute.run(
            self.node.compute.head_rows_last, share.tensor, share.row_start
        )
        self.node.counters.head_parts += 1
        self.node.counters.head_seconds += time.perf_counter() - start
        reply = HeadPart(share.request_id, share.position, share.row_start, part)
        await self.node.router.send_to(peer, HEAD_STREAM, encode_message(reply))

    async def on_part(self, part: HeadPart, peer: str) -> None:
        """Last stage: the first stage's part of the logits arrived; sample the token.

        Raises `ValueError` for a part from a peer that is not the first stage, or one that
        is not the part awaited: the request could never go on (nothing else would bring
        its token), so it fails now with the reason instead of waiting out the client's
        timeout."""
        state = self.node.request(part.request_id)
        pending = state.head if state is not None else None
        if state is None or pending is None:
            # Of a request released meanwhile, or a part already joined.
            self.node.counters.stale_messages += 1
            log.info("%s: head part for %r dropped (not awaited)", self.node.name, part.request_id)
            return
        if peer != state.meta.route[0]:
            raise ValueError(
                f"a head part of {part.request_id!r} from {peer}, which is not its first stage"
            )
        if pending.position != part.position or pending.rows != part.row_start:
            raise ValueError(
                f"the head part of {part.request_id!r} is for position {part.position}, rows "
                f"{part.row_start}.. but position {pending.position}, rows {pending.rows}.. "
                "is awaited"
            )
        state.head = None
        token, own_wait = await self.node.compute.run(
            self.node.compute.sample_joined,
            state.params,
            pending.own,
            part.tensor,
            pending.position + pending.length,
        )
        tuner = self.node.compute.head_tuner
        if pending.timed and tuner is not None:
            tuner.observe_split(pending.rows, time.perf_counter() - pending.started, own_wait)
        await self.node.sampled(part.request_id, token)
