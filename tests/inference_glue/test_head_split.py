"""HeadSplitTuner: where the last stage cuts the LM head, replayed from modelled timings."""

from __future__ import annotations

import pytest

from inference_glue.head_split import HeadSplitTuner

VOCAB = 1000


def run(tuner: HeadSplitTuner, tokens: int, head: float, hops: float) -> list[int]:
    """Feed `tokens` tokens of a machine where the whole head takes `head` seconds on either
    stage and the first stage's part comes back after `hops` seconds plus its compute."""
    chosen = []
    for _ in range(tokens):
        rows = tuner.next_rows()
        chosen.append(rows)
        if rows == VOCAB:
            tuner.observe_whole(head)
            continue
        own = head * rows / VOCAB
        other = hops + head * (VOCAB - rows) / VOCAB
        tuner.observe_split(rows, max(own, other), own_wait=max(0.0, own - other))
    return chosen


def test_the_cut_settles_where_both_parts_finish_together() -> None:
    tuner = HeadSplitTuner(VOCAB, 600)
    assert tuner.next_rows() == 600
    # Whole head 20 ms, hops 3 ms: both parts take 11.5 ms at 57.5% of the rows here; the
    # cut stops a little above, where its own part is wait_threshold (0.5 ms) late: 58.75%.
    chosen = run(tuner, 200, head=0.020, hops=0.003)
    assert tuner.splitting and 0.575 <= tuner.rows / VOCAB <= 0.6
    assert tuner.split_seconds is not None and tuner.split_seconds < 0.0125
    # One token in probe_every is timed whole, to notice a change.
    assert chosen.count(VOCAB) == pytest.approx(200 / tuner.probe_every, abs=2)
    assert tuner.as_dict()["splitting"] is True


def test_the_cut_moves_towards_the_slower_side_within_bounds() -> None:
    tuner = HeadSplitTuner(VOCAB, 500)
    tuner.observe_split(500, 0.010, own_wait=0.002)  # ours was the slower: give rows away
    assert tuner.rows == 490
    tuner.observe_split(490, 0.010, own_wait=0.0)  # theirs was: keep more
    assert tuner.rows == 500
    # A first stage whose part is always back at once gets all it can: all but min_fraction.
    for _ in range(100):
        own = 0.020 * tuner.rows / VOCAB
        tuner.observe_split(tuner.rows, own, own_wait=own - 0.0001)
    assert tuner.rows == 50
    assert HeadSplitTuner(VOCAB, VOCAB).rows == VOCAB - 50


def test_no_split_where_hops_cost_more_than_the_head() -> None:
    """A fast accelerator: the head takes 1 ms, a hop 2 ms. The tuner times both ways and
    computes the head alone, splitting only one token in probe_every."""
    tuner = HeadSplitTuner(VOCAB, 600, probe_every=8)
    chosen = run(tuner, 80, head=0.001, hops=0.004)
    assert not tuner.splitting
    assert chosen[-40:].count(VOCAB) == 35  # 5 probes in 40
    # The link gets faster: the probes notice and splitting resumes.
    run(tuner, 80, head=0.020, hops=0.003)
    assert tuner.splitting


def test_nonsense_observations_are_ignored() -> None:
    tuner = HeadSplitTuner(VOCAB, 500)
    for rows, seconds, wait in (
        (0, 0.01, 0.0),
        (VOCAB, 0.01, 0.0),
        (500, 0.0, 0.0),
        (500, 0.01, -1),
    ):
        tuner.observe_split(rows, seconds, wait)
    tuner.observe_whole(0.0)
    assert tuner.observations == 0 and tuner.rows == 500
    with pytest.raises(ValueError):
        HeadSplitTuner(1, 0)
