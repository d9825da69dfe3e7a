"""N consecutive fresh starts of a live 3-node exo cluster, chaos-style: the fault scenarios
and discovery modes cycle so that any 5 consecutive starts exercise each of them, a
fraction of the starts run with CPU burners, and a summary gives counts and times."""

from __future__ import annotations

import math
import subprocess
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .common import REPO_ROOT, exo_env, spread, table
from .logs import count_keys
from .start import MODES, SCENARIOS, ClusterSetup, StartPlan, run_start

TIMES = (
    "api_s",
    "agree_s",
    "kill_new_master_s",
    "kill_state_s",
    "stop_new_master_s",
    "reconverge_s",
    "rejoin_s",
)


def plan_starts(
    count: int,
    burn: float,
    scenarios: Sequence[str] = SCENARIOS,
    modes: Sequence[str] = MODES,
) -> list[StartPlan]:
    """Scenario i cycles with period len(scenarios); the mode shifts by one every
    len(modes) starts, so that with three of each, 9 starts cover every pair and any 5
    consecutive starts every scenario and every mode. Burners run in a `burn` fraction of
    the starts, spread evenly (0.5: every other start)."""
    plans = []
    for i in range(count):
        mode = modes[(i + i // len(modes)) % len(modes)]
        burning = math.floor((i + 1) * burn) > math.floor(i * burn)
        plans.append(StartPlan(i, scenarios[i % len(scenarios)], mode, burning))
    return plans


def code_origin(setup: ClusterSetup) -> dict[str, Any]:
    """Where exo processes of this run import our packages from (this checkout, first on
    their PYTHONPATH, rather than any installed copy)."""
    code = (
        "import router, discovery, exo_swap, exo.routing.router as r\n"
        "print(router.__file__); print(discovery.__file__); print(exo_swap.__file__)\n"
        "print(r.Router.__module__)\n"
    )
    out = subprocess.run(
        [setup.python, "-c", code],
        cwd=setup.copy,
        env=exo_env(setup.copy, setup.work / "home-origin"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 4:
        return {"error": out.stderr.strip()[-1000:], "ok": False}
    files = dict(zip(("router", "discovery", "exo_swap"), lines[:3]))
    ours = all(path.startswith(str(REPO_ROOT) + "/") for path in files.values())
    return {**files, "exo_router": lines[3], "repo": str(REPO_ROOT), "ok": ours}


def run_cluster(setup: ClusterSetup, plans: Sequence[StartPlan]) -> dict[str, Any]:
    origin = code_origin(setup)
    starts: list[dict[str, Any]] = []
    for plan in plans:
        if setup.deadline.expired:
            starts.append(
                {
                    "index": plan.index + 1,
                    "scenario": plan.scenario,
                    "mode": plan.mode,
                    "burn": plan.burn,
                    "ok": False,
                    "failures": [{"kind": "not_run", "detail": "--max-seconds ran out"}],
                }
            )
            continue
        start = run_start(plan, setup)
        starts.append(start)
        setup.log(
            f"  start {start['index']}: {'ok' if start['ok'] else 'FAILED'}"
            f" in {start['seconds']} s {start['times']}"
        )
    problems = [] if origin.get("ok") else [f"exo does not run this checkout's code: {origin}"]
    for start in starts:
        for failure in start["failures"]:
            problems.append(
                f"start {start['index']} ({start['scenario']}, {start['mode']}"
                f"{', burn' if start['burn'] else ''}): {failure['kind']}: {failure['detail']}"
            )
    return {
        "worker": setup.worker,
        "p2pr": " ".join(setup.p2pr),
        "code": origin,
        "starts": starts,
        "summary": summarize(starts),
        "problems": problems,
        "ok": not problems,
    }


def _tally(starts: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    tally: dict[str, dict[str, int]] = {}
    for start in starts:
        row = tally.setdefault(str(start[key]), {"runs": 0, "ok": 0})
        row["runs"] += 1
        row["ok"] += bool(start["ok"])
    return tally


def _times(starts: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: spread([s["times"][name] for s in starts if s.get("times", {}).get(name) is not None])
        for name in TIMES
    }


def summarize(starts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts per scenario, mode and load; failure kinds; median and worst times (over the
    starts where the step succeeded); how often each kind of log evidence appeared."""
    observed = [s for s in starts if "observer" in s]
    evidence_starts: Counter[str] = Counter()
    evidence_lines: Counter[str] = Counter()
    for start in starts:
        flat = count_keys(start.get("evidence", {}))
        evidence_starts.update(flat.keys())
        evidence_lines.update(flat)
    splits = [s["splits"] for s in starts if "splits" in s]
    return {
        "starts": len(starts),
        "ok": sum(bool(s["ok"]) for s in starts),
        "failed": sum(not s["ok"] for s in starts),
        "by_scenario": _tally(starts, "scenario"),
        "by_mode": _tally(starts, "mode"),
        "by_burn": _tally(starts, "burn"),
        "failure_kinds": dict(Counter(f["kind"] for s in starts for f in s["failures"])),
        "times": _times(starts),
        "times_burn": _times([s for s in starts if s["burn"]]),
        "times_quiet": _times([s for s in starts if not s["burn"]]),
        "observer": {
            "runs": len(observed),
            "saw_all_nodes": sum(not s["observer"]["missing"] for s in observed),
            "disturbed": sum(bool(s["observer"]["disturbed"]) for s in observed),
            "in_state": sum(bool(s["observer"]["in_state"]) for s in observed),
        },
        "splits": {
            "starts_with_split_over_1s": sum(bool(s["episodes"]) for s in splits),
            "longest_s": max((s["longest_s"] for s in splits), default=0.0),
        },
        "evidence_starts": dict(sorted(evidence_starts.items())),
        "evidence_lines": dict(sorted(evidence_lines.items())),
    }


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def starts_table(starts: Sequence[dict[str, Any]]) -> str:
    rows = [("#", "scenario", "discovery", "burn", "result", "agree s", "scenario s", "failures")]
    for s in starts:
        times = s.get("times", {})
        scenario_times = [
            f"{k.removesuffix('_s')}={times[k]:.1f}"
            for k in ("kill_new_master_s", "stop_new_master_s", "reconverge_s", "rejoin_s")
            if times.get(k) is not None
        ]
        rows.append(
            (
                str(s["index"]),
                s["scenario"],
                s["mode"],
                "yes" if s["burn"] else "",
                "ok" if s["ok"] else "FAILED",
                _secs(times.get("agree_s")),
                " ".join(scenario_times) or "-",
                ", ".join(f["kind"] for f in s["failures"]) or "",
            )
        )
    return table(rows)


def summary_table(summary: dict[str, Any]) -> str:
    rows = [("summary", "runs / ok", "median s", "worst s")]
    rows.append(("starts", f"{summary['starts']} / {summary['ok']}", "", ""))
    for group in ("by_scenario", "by_mode", "by_burn"):
        for key, row in summary[group].items():
            label = {"True": "with CPU burners", "False": "without burners"}.get(key, key)
            rows.append((f"  {label}", f"{row['runs']} / {row['ok']}", "", ""))
    for name, stats in summary["times"].items():
        if stats["n"]:
            rows.append(
                (f"  {name}", f"n={stats['n']}", _secs(stats["median"]), _secs(stats["worst"]))
            )
    observer = summary["observer"]
    rows.append(
        (
            "observer (p2pr health)",
            f"{observer['runs']} / saw all {observer['saw_all_nodes']}",
            f"disturbed {observer['disturbed']}",
            f"in state {observer['in_state']}",
        )
    )
    for kind, count in summary["failure_kinds"].items():
        rows.append((f"failure: {kind}", str(count), "", ""))
    for key, count in summary["evidence_starts"].items():
        rows.append((f"log: {key}"[:90], f"{count} start(s)", "", ""))
    return table(rows)
