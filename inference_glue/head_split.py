"""Where the last stage cuts the LM head between itself and the first stage.

With tied embeddings the first stage holds the head's matrix too, so the last stage can send
it the final hidden state (`HeadShare`) and compute rows `0 .. rows - 1` of the logits while
the first stage computes the rest (`HeadPart`). Any cut gives the same logits bit for bit, so
the cut may move freely from token to token: only the speed changes.

What pays depends on the hardware. The first stage's part comes back two hops later, so
where computing the head is cheap next to a hop (a fast accelerator, a slow link) splitting
loses. `HeadSplitTuner` times the head on the last stage, from its final hidden state to the
logits ready to sample, for split tokens and for tokens it computes alone, and:

- splits while split tokens are faster on average (EWMA), else computes the head alone;
- times the other way one token in `probe_every`, so that a change is noticed;
- moves the cut a step towards the slower side after each split token: when its own part
  was not done as the first stage's arrived, it keeps fewer rows, else more.

No clock inside: the node passes the durations in, so tests replay any schedule.
"""

from __future__ import annotations

import attrs

__all__ = ["HeadSplitTuner"]


def _ewma(old: float | None, sample: float, weight: float) -> float:
    return sample if old is None else (1 - weight) * old + weight * sample


@attrs.define
class HeadSplitTuner:
    """The cut for the next tokens one last stage samples.

    Args:
        vocab: rows of the head.
        rows: the first cut, rows the last stage computes (the client's
            `RequestMeta.head_split`).
        step: how far one split token moves the cut, as a fraction of `vocab`.
        min_fraction: neither side gets fewer rows than this fraction.
        probe_every: one token in this many is computed the other way (split or not).
        wait_threshold: seconds of waiting for its own part, once the first stage's has
            arrived, beyond which the last stage counts itself the slower side.
        weight: of a new timing in the averages.
    """

    vocab: int
    rows: int
    step: float = 0.01
    min_fraction: float = 0.05
    probe_every: int = 32
    wait_threshold: float = 0.0005
    weight: float = 0.2
    split_seconds: float | None = None
    whole_seconds: float | None = None
    observations: int = 0
    _count: int = 0

    def __attrs_post_init__(self) -> None:
        if self.vocab < 2:
            raise ValueError(f"a head of {self.vocab} rows cannot be split")
        self.rows = self._clamp(self.rows)

    def _clamp(self, rows: int) -> int:
        least = max(1, round(self.vocab * self.min_fraction))
        return max(least, min(self.vocab - least, rows))

    @property
    def splitting(self) -> bool:
        """Whether split tokens are the faster (True until both ways have been timed)."""
        if self.split_seconds is None or self.whole_seconds is None:
            return True
        return self.split_seconds < self.whole_seconds

    def next_rows(self) -> int:
        """Rows the last stage computes for the next token it samples; `vocab` means no
        split (it computes the whole head)."""
        self._count += 1
        probe = self._count % self.probe_every == 0
        if self.whole_seconds is None and self.split_seconds is not None:
            probe = True  # time the whole head once, as soon as a split has been timed
        return self.rows if self.splitting != probe else self.vocab

    def observe_split(self, rows: int, seconds: float, own_wait: float) -> None:
        """A split token: from sending the hidden state to the joined logits took `seconds`;
        this stage waited `own_wait` for its own part after the other part had arrived."""
        if not 0 < rows < self.vocab or seconds <= 0 or own_wait < 0:
            return
        self.observations += 1
        self.split_seconds = _ewma(self.split_seconds, seconds, self.weight)
        move = max(1, round(self.vocab * self.step))
        self.rows = self._clamp(rows - move if own_wait > self.wait_threshold else rows + move)

    def observe_whole(self, seconds: float) -> None:
        """A token whose whole head this stage computed, in `seconds`."""
        if seconds > 0:
            self.observations += 1
            self.whole_seconds = _ewma(self.whole_seconds, seconds, self.weight)

    def as_dict(self) -> dict[str, object]:
        """For the node's stats."""
        return {
            "rows": self.rows,
            "fraction": round(self.rows / self.vocab, 3),
            "splitting": self.splitting,
            "split_ms": round(self.split_seconds * 1000, 3) if self.split_seconds else None,
            "whole_ms": round(self.whole_seconds * 1000, 3) if self.whole_seconds else None,
            "observations": self.observations,
        }
