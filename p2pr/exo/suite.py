"""exo's own test suite, bare vs with the adapter, and the adapter self-test, in work copies
of an exo checkout (the checkout itself is never touched)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from .apply import apply, checkout, revert, status
from .common import exo_env, table

# Test files that must pass with the adapter (paths under the exo checkout).
REQUIRED_AREAS = {
    "routing": ("src/exo/routing/",),
    "election": ("src/exo/shared/tests/test_election.py",),
    "master": ("src/exo/master/",),
    "api": ("src/exo/api/",),
    "download": ("src/exo/download/",),
}

SUITE_TIMEOUT = 1200.0


# ---------------------------------------------------------------------------- work copies


def _copy_checkout(exo_src: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", "node_modules", "target", "__pycache__", ".venv", ".pytest_cache"
    )
    shutil.copytree(exo_src, dest, ignore=ignore, symlinks=True)
    if status(dest) != "exo":
        revert(dest)
    return dest


def bare_copy(exo_src: Path, work: Path) -> Path:
    """A copy of the checkout with only the bare exo_rs stand-in (exo's own routing)."""
    checkout(exo_src)
    bare = _copy_checkout(exo_src, work / "exo-bare")
    apply(bare, bare=True)
    return bare


def adapter_copy(exo_src: Path, work: Path) -> Path:
    """A copy of the checkout with exo's routing replaced by ours."""
    checkout(exo_src)
    swapped = _copy_checkout(exo_src, work / "exo-adapter")
    apply(swapped)
    return swapped


# ---------------------------------------------------------------------------- exo's suite


@attrs.frozen
class SuiteResult:
    """One pytest run of exo's suite."""

    name: str
    counts: dict[str, int]  # passed, failed, error, skipped
    files: dict[str, dict[str, int]]  # test file -> counts
    collection_errors: dict[str, str]  # test file -> first line of the error
    failures: dict[str, str]  # test id -> first line
    seconds: float
    returncode: int

    @property
    def passed(self) -> int:
        return self.counts.get("passed", 0)

    def area(self, prefixes: Sequence[str]) -> dict[str, int]:
        total: Counter[str] = Counter()
        for path, counts in self.files.items():
            if path.startswith(tuple(prefixes)):
                total.update(counts)
        for path in self.collection_errors:
            if path.startswith(tuple(prefixes)):
                total["error"] += 1
        return dict(total)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "counts": self.counts,
            "collection_errors": self.collection_errors,
            "failures": self.failures,
            "seconds": round(self.seconds, 1),
            "returncode": self.returncode,
            "areas": {area: self.area(prefixes) for area, prefixes in REQUIRED_AREAS.items()},
        }


def run_suite(name: str, copy: Path, work: Path, python: str) -> SuiteResult:
    """exo's pytest suite in `copy` (its own pyproject settings, plus junit output)."""
    report = work / f"junit-{name}.xml"
    log = work / f"pytest-{name}.log"
    cmd = [
        python,
        "-m",
        "pytest",
        "src",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:trio",  # our test extra installs pytest-trio; exo's suite is asyncio
        "--continue-on-collection-errors",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={report}",
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd,
            cwd=copy,
            env=exo_env(copy, work / f"home-{name}"),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SUITE_TIMEOUT,
            check=False,
        )
    seconds = time.monotonic() - started
    if not report.exists():
        raise RuntimeError(f"pytest wrote no report ({name}); see {log}")
    return _parse_junit(name, report, seconds, proc.returncode)


def _parse_junit(name: str, report: Path, seconds: float, returncode: int) -> SuiteResult:
    counts: Counter[str] = Counter()
    files: dict[str, Counter[str]] = {}
    collection: dict[str, str] = {}
    failures: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("file") or ""
        classname = case.get("classname") or ""
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().split("\n")[0]
                break
        if not classname and outcome == "error":  # a file that failed to load
            file_path = case.get("name", "").replace(".", "/") + ".py"
            collection[path or file_path] = _load_error(case) or message
            continue
        counts[outcome] += 1
        files.setdefault(path, Counter())[outcome] += 1
        if outcome in ("failed", "error"):
            failures[f"{path}::{case.get('name')}"] = message
    return SuiteResult(
        name=name,
        counts=dict(counts),
        files={path: dict(c) for path, c in files.items()},
        collection_errors=collection,
        failures=failures,
        seconds=seconds,
        returncode=returncode,
    )


def _load_error(case: ET.Element) -> str:
    """The exception line of a collection error ("ModuleNotFoundError: …")."""
    for child in case:
        lines = (child.text or "").splitlines()
        for line in reversed(lines):
            text = line.removeprefix("E").strip()
            if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", text):
                return text
    return ""


def suite_verdict(bare: SuiteResult, adapter: SuiteResult) -> list[str]:
    """What is wrong (empty: the adapter run is at least as good, required areas pass)."""
    problems = []
    if adapter.passed < bare.passed:
        problems.append(f"adapter passes {adapter.passed} tests, bare {bare.passed}")
    for area, prefixes in REQUIRED_AREAS.items():
        counts = adapter.area(prefixes)
        if not counts.get("passed"):
            problems.append(f"{area}: no test passed")
        if counts.get("failed") or counts.get("error"):
            problems.append(f"{area}: {counts}")
    return problems


# ---------------------------------------------------------------------------- self-test


def run_selftest(copy: Path, work: Path, python: str) -> dict[str, Any]:
    """`python -m p2pr.exo.selftest --json` in the adapter copy."""
    proc = subprocess.run(
        [python, "-m", "p2pr.exo.selftest", "--json"],
        cwd=copy,
        env=exo_env(copy, work / "home-selftest"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            result: dict[str, Any] = json.loads(line)
            return result
    return {"ok": False, "error": f"no result (exit {proc.returncode}): {proc.stderr[-2000:]}"}


def selftest_table(result: dict[str, Any]) -> str:
    rows = [("two adapter Routers, exo's topics and types", "result", "")]
    for key, value in result.items():
        if key not in ("ok", "failed", "error"):
            rows.append((f"  {key}", str(value), ""))
    rows.append(("error", str(result.get("error") or "none"), ""))
    return table(rows)


def suite_table(bare: SuiteResult, adapter: SuiteResult) -> str:
    rows = [("exo's tests (pytest src/)", "bare exo_rs stand-in", "adapter")]

    def fmt(counts: dict[str, int]) -> str:
        keys = ("passed", "failed", "error", "skipped")
        return ", ".join(f"{counts.get(k, 0)} {k}" for k in keys if counts.get(k) or k == "passed")

    rows.append(("whole suite", fmt(bare.counts), fmt(adapter.counts)))
    rows.append(
        (
            "files that fail to load",
            str(len(bare.collection_errors)),
            str(len(adapter.collection_errors)),
        )
    )
    for area, prefixes in REQUIRED_AREAS.items():
        rows.append((f"  {area}", fmt(bare.area(prefixes)), fmt(adapter.area(prefixes))))
    rows.append(("seconds", f"{bare.seconds:.0f}", f"{adapter.seconds:.0f}"))
    return table(rows)
