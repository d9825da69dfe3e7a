"""Which requests a protocol verdict breaks at a stage node (`inference_glue.link_watch`);
the node's answer, a "lost" failure and a resumed request, is in test_inprocess_pipeline
and test_pipeline_joints."""

from __future__ import annotations

from inference_glue.link_watch import LinkLost, affected
from inference_glue.messages import (
    ACTIVATION_STREAM,
    CHUNK_STREAM,
    CONTROL_STREAM,
    TOKENS,
    RequestMeta,
)
from p2p_reliable import NOT_REPAIRED, Gap, Rejected, Unrecoverable

THROUGH_B = RequestMeta("r1", 8, 0.0, 1.0, None, 16, ("a", "b", "c"), "client")
ELSEWHERE = RequestMeta("r2", 8, 0.0, 1.0, None, 16, ("a", "d"), "other")
REQUESTS = [THROUGH_B, ELSEWHERE]


def test_a_message_given_up_to_a_stage_breaks_the_requests_routed_through_it() -> None:
    event = Unrecoverable(ACTIVATION_STREAM, 7, "b", "peer removed")
    [lost] = affected(event, REQUESTS)
    assert lost == LinkLost("r1", "b", lost.detail)
    assert "given up (peer removed)" in lost.detail and ACTIVATION_STREAM in lost.detail


def test_a_gap_from_a_stage_breaks_its_requests_too() -> None:
    event = Gap("d", ACTIVATION_STREAM, 3, 5, "not repaired within gap_timeout", direct=True)
    assert [(x.request_id, x.peer) for x in affected(event, REQUESTS)] == [("r2", "d")]
    assert "messages 3-4" in affected(event, REQUESTS)[0].detail
    # What the publisher gave up, it reports itself (this Gap may come late, when another
    # attempt of the request is in flight).
    assert affected(Gap("d", ACTIVATION_STREAM, 3, 5, NOT_REPAIRED, direct=True), REQUESTS) == []


def test_a_token_chunk_given_up_breaks_only_that_requesters_requests() -> None:
    for stream in (CHUNK_STREAM, TOKENS.topic):
        event = Unrecoverable(stream, 1, "client", "retry budget exhausted")
        assert [x.request_id for x in affected(event, REQUESTS)] == ["r1"]
    # "b" is a stage of r1, not its requester: a chunk to it is no chunk of r1's.
    assert affected(Unrecoverable(CHUNK_STREAM, 1, "b"), REQUESTS) == []


def test_other_streams_and_other_events_break_nothing() -> None:
    assert affected(Unrecoverable(CONTROL_STREAM, 1, "b", "peer removed"), REQUESTS) == []
    assert affected(Unrecoverable(ACTIVATION_STREAM, 1, "z"), REQUESTS) == []
    assert affected(Rejected("b", "bad frame"), REQUESTS) == []
