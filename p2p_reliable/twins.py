"""Telling a cloned identity from a restart or a pause.

One node id heard under two runs (epochs, instances) is either a restart (the old run stopped,
the new one took over) or two live machines with one identity file (a cloned disk). A pause
(SIGSTOP, a GC stall, a laptop lid) is neither: the same run falls silent and comes back.
Only interleaving tells the clone apart: the run that was heard first is heard again after
the other one started. `TwinDetector` records, per id, when each run was first and last
heard, and reports an id only on that evidence, and only while it is recent.

Sans-IO and bounded: at most `max_runs` runs per id and `max_ids` ids are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import attrs


@attrs.define
class _Run:
    first: float
    last: float


class TwinDetector:
    """Ids heard from two interleaved runs within the last `window` seconds.

    `slack` absorbs messages of a run that ended but were still on their way (queued,
    delayed) when its successor started: they do not count as interleaving.
    """

    def __init__(
        self, *, window: float = 10.0, slack: float = 0.5, max_runs: int = 4, max_ids: int = 4096
    ) -> None:
        self.window = window
        self.slack = slack
        self.max_runs = max_runs
        self.max_ids = max_ids
        self._runs: OrderedDict[str, dict[Hashable, _Run]] = OrderedDict()

    def heard(self, node: str, run: Hashable, now: float) -> None:
        """Something from `node`'s run `run` arrived at `now`."""
        runs = self._runs.get(node)
        if runs is None:
            runs = self._runs[node] = {}
            while len(self._runs) > self.max_ids:
                self._runs.popitem(last=False)
        self._runs.move_to_end(node)
        entry = runs.get(run)
        if entry is None:
            runs[run] = _Run(now, now)
            if len(runs) > self.max_runs:
                oldest = min(runs, key=lambda r: runs[r].last)
                del runs[oldest]
        elif now > entry.last:
            entry.last = now

    def twins(self, now: float) -> list[str]:
        """Ids with two runs heard interleaved, both within the window."""
        return sorted(node for node in self._runs if self.is_twin(node, now))

    def is_twin(self, node: str, now: float) -> bool:
        """Whether `node` shows two live, interleaved runs."""
        recent = [r for r in self._runs.get(node, {}).values() if now - r.last <= self.window]
        recent.sort(key=lambda r: r.first)
        return any(
            earlier.last > later.first + self.slack
            for i, earlier in enumerate(recent)
            for later in recent[i + 1 :]
        )

    def runs(self, node: str) -> int:
        """How many runs of `node` are remembered (for tests and reports)."""
        return len(self._runs.get(node, {}))
