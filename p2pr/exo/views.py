"""What the nodes of a live exo cluster think at one moment (whom each follows, whom each
API state lists), when they agree, and how long they did not: split-brain episodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from .common import short
from .procs import ExoNode


@attrs.frozen
class Snapshot:
    """Each considered node's master (from its log) and API state (node ids; None: no answer)."""

    masters: dict[str, str | None]  # node name -> master's node id
    states: dict[str, frozenset[str] | None]  # node name -> ids listed
    names: dict[str, str]  # node id -> node name, for reports

    @staticmethod
    def take(nodes: Sequence[ExoNode], all_nodes: Sequence[ExoNode], worker: bool) -> Snapshot:
        return Snapshot(
            masters={n.name: n.scan().master for n in nodes},
            states={n.name: n.state_nodes() if worker else None for n in nodes},
            names={n.node_id: n.name for n in all_nodes},
        )

    def master(self, expected: frozenset[str]) -> str | None:
        """The one master every considered node follows, if it is one of `expected`."""
        masters = set(self.masters.values())
        if len(masters) != 1:
            return None
        master = next(iter(masters))
        return master if master in expected else None

    def agreed(self, expected: frozenset[str], *, with_state: bool) -> str | None:
        """One master among `expected`, and (with_state) every state lists exactly them."""
        master = self.master(expected)
        if master is None or not with_state:
            return master
        return master if all(s == expected for s in self.states.values()) else None

    @property
    def split(self) -> bool:
        """Two masters at once, or states that list different numbers of nodes."""
        masters = {m for m in self.masters.values() if m}
        sizes = {len(s) for s in self.states.values() if s is not None}
        return len(masters) > 1 or len(sizes) > 1

    def follows(self) -> dict[str, str]:
        """node -> the node it follows (a name where the master is one of ours)."""
        return {
            name: "-" if m is None else self.names.get(m, short(m))
            for name, m in self.masters.items()
        }

    def state_sizes(self) -> dict[str, int | None]:
        return {name: None if s is None else len(s) for name, s in self.states.items()}

    def describe(self) -> str:
        follows = ", ".join(f"{n}->{m}" for n, m in self.follows().items())
        sizes = "/".join("-" if v is None else str(v) for v in self.state_sizes().values())
        return f"follows {follows}; state sizes {sizes}"

    def classify(self, expected: frozenset[str]) -> str:
        """Why these nodes do not agree (the failure kind)."""
        masters = {m for m in self.masters.values() if m}
        if len(masters) > 1:
            return "split_brain"
        if not masters or None in self.masters.values():
            return "no_master"
        if next(iter(masters)) not in expected:
            return "stale_master"  # all follow a node that is gone or hung
        sizes = {len(s) for s in self.states.values() if s is not None}
        if len(sizes) > 1:
            return "split_state"
        return "state_incomplete"

    def details(self, expected: frozenset[str]) -> dict[str, Any]:
        return {
            "follows": self.follows(),
            "state_sizes": self.state_sizes(),
            "state_missing": {
                name: sorted(self.names.get(i, short(i)) for i in expected - s)
                for name, s in self.states.items()
                if s is not None and expected - s
            },
            "state_extra": {
                name: sorted(self.names.get(i, short(i)) for i in s - expected)
                for name, s in self.states.items()
                if s is not None and s - expected
            },
        }


@attrs.define
class SplitWatch:
    """Episodes in which the considered nodes were split (see Snapshot.split).

    Before a cluster first agrees its nodes follow themselves, which is no split: episodes
    count once `armed`. Short ones are normal while an election result reaches the nodes one
    by one; all are counted, those of at least `report_after` seconds are listed, and one
    still open at the end (however it began) is listed as `ongoing`."""

    started: float
    armed: bool = False
    report_after: float = 1.0
    max_listed: int = 10
    count: int = 0
    longest: float = 0.0
    listed: list[dict[str, Any]] = attrs.field(factory=list)
    _current: dict[str, Any] | None = None
    _since: float = 0.0

    def observe(self, snapshot: Snapshot, now: float, phase: str) -> None:
        if not snapshot.split:
            self.close(now)
            return
        if self._current is None:
            self._since = now
            self._current = {
                "phase": phase,
                "from_s": round(now - self.started, 2),
                "first": snapshot.describe(),
            }
        self._current["last"] = snapshot.describe()

    def ongoing(self, now: float) -> dict[str, Any] | None:
        """The episode still open (with its duration so far)."""
        if self._current is None:
            return None
        return {**self._current, "seconds": round(now - self._since, 2), "ongoing": True}

    def close(self, now: float) -> None:
        episode, self._current = self._current, None
        if episode is None or not self.armed:
            return
        self._count(episode, now)
        if episode["seconds"] >= self.report_after and len(self.listed) < self.max_listed:
            self.listed.append(episode)

    def _count(self, episode: dict[str, Any], now: float) -> None:
        episode["seconds"] = round(now - self._since, 2)
        self.count += 1
        self.longest = max(self.longest, now - self._since)

    def report(self, now: float) -> dict[str, Any]:
        """Every episode counted and listed, the open one included."""
        listed, count, longest = list(self.listed), self.count, self.longest
        ongoing = self.ongoing(now)
        if ongoing is not None:
            listed.append(ongoing)
            count, longest = count + 1, max(longest, ongoing["seconds"])
        return {"count": count, "longest_s": round(longest, 2), "episodes": listed}
