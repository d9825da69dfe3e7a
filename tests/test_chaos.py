"""`p2pr chaos --json`: the whole fault matrix over real 3-process pipelines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_glue.chaos import ROWS

pytestmark = pytest.mark.multinode

P2PR = str(Path(sys.executable).parent / "p2pr")


def test_chaos_matrix_passes_every_row() -> None:
    proc = subprocess.run(
        [P2PR, "chaos", "--json", "--tokens", "32"], capture_output=True, text=True, timeout=900
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert [row["name"] for row in report["rows"]] == [row.name for row in ROWS]
    for row in report["rows"]:
        assert row["error"] == "", row
        assert row["tokens"] == 32 and row["identical"], row
        assert row["duplicates_delivered"] == 0 and row["corrupted_accepted"] == 0, row
        assert row["delivered"] > 0, row
    rows = {row["name"]: row for row in report["rows"]}
    # The faults really happened, and were repaired.
    assert rows["drop 30%"]["retransmits"] > 0
    assert rows["corrupt 5%"]["corrupt_rejected"] > 0
    for name in ("SIGKILL middle stage", "SIGKILL last stage", "kill and restart"):
        assert rows[name]["failovers"] == 1 and rows[name]["recover_s"] is not None, rows[name]
        assert "connection closed" in rows[name]["notes"]
    # A hung node keeps its connections open: phi accrual and a probe find it (the client's
    # own, or its router's, which then closes the connection).
    hung = rows["SIGSTOP (hung) middle stage"]
    assert hung["failovers"] == 1, hung
    assert "phi accrual" in hung["notes"] or "connection closed" in hung["notes"], hung
    assert "rejoined" in rows["kill and restart"]["notes"]
    assert report["passed"] and proc.returncode == 0


def test_chaos_lists_rows_and_refuses_unknown_ones() -> None:
    listed = subprocess.run([P2PR, "chaos", "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    assert all(row.name in listed.stdout for row in ROWS)
    bad = subprocess.run(
        [P2PR, "chaos", "--only", "no such row"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "no chaos row matches" in bad.stderr
