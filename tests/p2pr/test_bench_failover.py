"""`p2pr bench failover` in its smallest form, through the command, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_glue.tiny_model import build_tiny_model

P2PR = str(Path(sys.executable).parent / "p2pr")
FIGURES = ("kill_to_next_token_s", "kill_to_resumed_s", "detect_s", "replan_s", "resume_s")


@pytest.mark.multinode
def test_one_kill_of_the_middle_stage_gives_the_reference_answer(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    out = subprocess.run(
        [
            P2PR,
            "bench",
            "failover",
            "--json",
            "--repeats=1",
            "--victims=middle",
            "--after=3",
            "--tokens=12",
            "--long=0",
            f"--model={model_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)  # --json: stdout is the one JSON document
    assert result["stages"] == 3 and result["repeats"] == 1
    assert result["all_identical"] is True
    [row] = result["rows"]
    assert (row["victim"], row["victim_stage"]) == ("middle", 1)
    assert (row["after_token"], row["tokens"]) == (3, 12)
    assert row["identical"] is True
    assert row["recoveries"] == [1]  # the kill was noticed and recovered from, once
    for figure in FIGURES:
        # One round: the median is the one value, and so is its spread.
        assert row[figure] is not None and row[figure] >= 0, figure
        assert row[f"{figure}_spread"] == [row[figure], row[figure]], figure


def test_kill_points_past_the_answer_are_refused() -> None:
    out = subprocess.run(
        [P2PR, "bench", "failover", "--after=64", "--tokens=64", "--model=tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "1 <= after < 64" in out.stderr
    assert "Traceback" not in out.stderr
