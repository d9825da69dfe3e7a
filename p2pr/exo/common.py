"""What every part of `p2pr.exo.check` shares: bounded waits, the overall deadline, the
environment of exo processes, and plain-text tables."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def exo_env(copy: Path, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for exo processes of one copy: its src first, then this repository
    (so that the code under test is this checkout's, not an installed copy), a HOME of its
    own, and nothing of the caller's exo or p2pr settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EXO_", "XDG_", "P2PR_")) and k not in ("PYTHONPATH", "HOME")
    }
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        PYTHONPATH=os.pathsep.join([str(copy / "src"), str(REPO_ROOT)]),
        PYTHONUNBUFFERED="1",
        BROWSER="true",  # exo opens its dashboard in a browser on first run
    )
    env.update(extra or {})
    return env


class Deadline:
    """The time left to the whole run (`seconds=None`: no overall limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    def remaining(self) -> float:
        if self.seconds is None:
            return math.inf
        return max(0.0, self.started + self.seconds - time.monotonic())

    def bound(self, seconds: float) -> float:
        """`seconds`, or less where the run's deadline comes first."""
        return min(seconds, self.remaining())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0


def wait_for(
    condition: Callable[[], Any], timeout: float, *, stable: float = 0.0, poll: float = 0.25
) -> tuple[Any, float | None]:
    """Poll until `condition()` is truthy (and stays equal for `stable` seconds).

    Returns (value, the time.monotonic() at which the final value first held) or
    (last value, None) on timeout.
    """
    deadline = time.monotonic() + timeout
    first: float | None = None
    held: Any = None
    value: Any = None
    while time.monotonic() < deadline:
        value = condition()
        now = time.monotonic()
        if value:
            if first is None or value != held:
                first, held = now, value
            if now - first >= stable:
                return value, first
        else:
            first, held = None, None
        time.sleep(poll)
    return value, None


def since(start: float, at: float | None) -> float | None:
    return None if at is None else round(at - start, 2)


def short(node_id: str | None) -> str:
    return "-" if not node_id else f"…{node_id[-8:]}"


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Count, median and worst (largest) of some durations; n=0 when there are none."""
    if not values:
        return {"n": 0, "median": None, "worst": None}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 2),
        "worst": round(max(values), 2),
    }


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows as aligned columns; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
