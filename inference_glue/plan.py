"""What a pipeline is made of: its stages as the nodes describe themselves, and the checks
that nodes form one pipeline (the same model files, the same BLAS set-up, contiguous layers
covering the model)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from inference_glue.messages import Failure, InfoReply

__all__ = [
    "PipelineError",
    "StageFailedError",
    "StageInfo",
    "check_pipeline",
    "check_pipeline_models",
    "peer_id_of",
]


class PipelineError(RuntimeError):
    """The nodes do not form a usable pipeline, or a node is unreachable or gone."""


class StageFailedError(RuntimeError):
    """A stage reported that it could not serve the request."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(
            f"request {failure.request_id!r} failed on stage {failure.stage} "
            f"(peer {failure.peer}): {failure.message}"
        )


@attrs.frozen
class StageInfo:
    """One stage of the pipeline, as its node describes itself."""

    index: int
    node_id: str
    layers: range
    num_layers: int
    model: str
    fingerprint: str
    blas: str
    blas_threads: str | None
    pid: int
    # Its KV caches can be taken over in a hand-off (`InfoReply.kv_handoff`).
    kv_handoff: bool = False

    @property
    def label(self) -> str:
        """'stage 1 (12D3KooW…)'."""
        return f"stage {self.index} ({self.node_id})"

    @classmethod
    def from_reply(cls, reply: InfoReply) -> StageInfo:
        """The stage a node describes in its `InfoReply`."""
        return cls(
            index=reply.stage,
            node_id=reply.node_id,
            layers=range(reply.layer_start, reply.layer_stop),
            num_layers=reply.num_layers,
            model=reply.model,
            fingerprint=reply.model_fingerprint,
            blas=reply.blas,
            blas_threads=reply.blas_threads,
            pid=reply.pid,
            kv_handoff=reply.kv_handoff,
        )


def check_pipeline_models(infos: Sequence[InfoReply]) -> None:
    """Check that the nodes serve the same model files with the same BLAS set-up."""
    stages = [StageInfo.from_reply(i) for i in infos]
    described = ", ".join(
        f"{s.label}: layers {s.layers.start}-{s.layers.stop - 1} of {s.num_layers} "
        f"of {s.model} [{s.fingerprint}]"
        for s in stages
    )
    if len({(s.fingerprint, s.num_layers) for s in stages}) != 1:
        raise PipelineError(f"the nodes do not serve the same model files: {described}")
    if len({(s.blas, s.blas_threads) for s in stages}) != 1:
        raise PipelineError(
            "the nodes use different BLAS set-ups, so results would not be bit-exact: "
            + ", ".join(f"{s.label}: {s.blas} x{s.blas_threads}" for s in stages)
        )


def check_pipeline(infos: Sequence[InfoReply]) -> list[StageInfo]:
    """The stages in order, after checking that the nodes form one pipeline."""
    if not infos:
        raise PipelineError("no stage nodes")
    check_pipeline_models(infos)
    stages = sorted((StageInfo.from_reply(i) for i in infos), key=lambda s: s.layers.start)
    described = ", ".join(
        f"{s.label}: layers {s.layers.start}-{s.layers.stop - 1} of {s.num_layers}" for s in stages
    )
    expected = 0
    for position, stage in enumerate(stages):
        if stage.layers.start != expected or stage.index != position:
            raise PipelineError(f"the nodes do not form one pipeline: {described}")
        expected = stage.layers.stop
    if expected != stages[0].num_layers or len(stages) != infos[0].num_stages:
        raise PipelineError(f"the nodes do not cover the whole model: {described}")
    return stages


def peer_id_of(addr: str) -> str:
    """The peer id at the end of a multiaddr '/ip4/…/tcp/…/p2p/<id>'."""
    _, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer:
        raise ValueError(f"multiaddr {addr!r} has no /p2p/<peer id>")
    return peer
