"""`p2pr bench loss-sweep`: a small sweep through the command, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inference_glue.tiny_model import build_tiny_model

P2PR = str(Path(sys.executable).parent / "p2pr")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.multinode
def test_a_small_sweep_writes_a_plot_and_one_json_row_per_rate(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    png = tmp_path / "plots" / "sweep.png"
    out = subprocess.run(
        [
            P2PR,
            "bench",
            "loss-sweep",
            "--json",
            "--rates=0.1,0",  # out of order on purpose: rows come sorted, loss-free first
            "--sizes=1024",
            "--seconds=1",
            "--tokens=8",
            "--generations=2",
            "--repeats=2",
            f"--model={model_dir}",
            f"--png={png}",
        ],
        capture_output=True,
        text=True,
        timeout=480,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # --json: the whole of stdout is the one JSON document; progress went to stderr.
    result = json.loads(out.stdout)
    assert "running: loss 10%" in out.stderr

    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # two panels with axes, lines and labels, not an empty canvas
    assert result["png"] == str(png.resolve())

    rows = result["rows"]
    assert result["repeats"] == 2
    assert [r["loss_rate"] for r in rows] == [0.0, 0.1]
    assert result["all_complete"] is True
    for row in rows:
        assert row["completed"] is True, row["errors"]
        assert row["matches_loss_free"] is True
        # Per round one warm-up request and two timed ones.
        assert row["tokens"] == [8] * 6 and row["requests"] == 6
        # Each figure is the median of the rounds, within their spread.
        for figure in ("ttft_ms", "token_latency_p99_ms", "decode_tokens_per_s"):
            low, high = row[f"{figure}_spread"]
            assert low <= row[figure] <= high, figure
        assert row["ttft_ms"] > 0
        assert row["token_latency_p99_ms"] >= row["token_latency_p50_ms"] > 0
        assert row["decode_tokens_per_s"] > 0
        [goodput] = row["goodput"]
        assert goodput["size_bytes"] == 1024
        assert goodput["delivery_ratio"] == 1.0
        assert goodput["goodput_msg_per_s"] > 0
        assert goodput["goodput_mb_per_s"] > 0
        low, high = goodput["goodput_msg_per_s_spread"]
        assert 0 < low <= goodput["goodput_msg_per_s"] <= high
    lossless, lossy = rows
    assert lossless["goodput"][0]["frames_dropped"] == 0
    assert lossless["frames_dropped"] == 0
    # The shim really dropped frames, and the protocol repaired them.
    assert lossy["goodput"][0]["frames_dropped"] > 0
    assert lossy["goodput"][0]["retransmits"] > 0


def test_without_matplotlib_the_command_names_the_plot_extra(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["matplotlib"] = None  # what an environment without the extra sees
        from p2pr.cli import main
        sys.exit(main(["bench", "loss-sweep", "--rates=0"]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2
    assert "matplotlib is not installed" in out.stderr
    assert "'plot' extra" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "loss-sweep.png").exists()


@pytest.mark.parametrize("rates", ["0,1.5", "0,x", ","])
def test_bad_rates_are_refused_by_the_parser(rates: str) -> None:
    out = subprocess.run(
        [P2PR, "bench", "loss-sweep", f"--rates={rates}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--rates" in out.stderr
