"""The `p2pr` console script, run as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

P2PR = shutil.which("p2pr") or str(Path(sys.executable).parent / "p2pr")


def test_bench_codec_json_has_the_documented_keys() -> None:
    out = subprocess.run(
        [P2PR, "bench", "codec", "--json", "--messages", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["encode_decode_us_per_1kib"] > 0
    assert result["checksum_gb_per_s"] > 0
    assert result["wire_bytes_per_1kib"] > 1024


def test_bench_codec_prints_a_table_and_json() -> None:
    out = subprocess.run(
        [P2PR, "bench", "codec", "--messages", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "xxh3-64 over 1 MiB" in out.stdout
    json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_delivers_everything_through_loss_and_corruption() -> None:
    out = subprocess.run([P2PR, "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every message delivered exactly once, in order, uncorrupted" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("│ node-")]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("│").split("│")]
        _node, sent, delivered, _dups, corrupt, retrans, _nacks, in_order = cells
        assert (sent, delivered, in_order) == ("200", "400", "yes")
        assert int(corrupt) > 0 and int(retrans) > 0  # the faults really happened
