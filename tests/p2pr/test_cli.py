"""The `p2pr` console script, run as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from p2p_reliable.envelope import Envelope, Kind, encode

P2PR = shutil.which("p2pr") or str(Path(sys.executable).parent / "p2pr")


# What `p2pr bench codec` measures (README, "Other commands"), and one 1 KiB message as it
# encodes it: the wire size is the envelope's, computed here. The timed figures are medians
# over the rounds, each with its spread.
TIMED_CODEC_KEYS = {
    "encode_decode_us_per_1kib",
    "encode_us_per_1kib",
    "decode_us_per_1kib",
    "checksum_gb_per_s",
}
CODEC_KEYS = {
    *TIMED_CODEC_KEYS,
    *(f"{key}_spread" for key in TIMED_CODEC_KEYS),
    "wire_bytes_per_1kib",
    "messages",
    "repeats",
}


def one_kib_wire_size() -> int:
    envelope = Envelope(
        kind=Kind.DATA,
        origin="12D3KooWGzBxq6pJk2Yx3bV5qzfs4s9kbc6HhQ9d3w4m1pLr8vTe",
        stream="global_events",
        epoch=1_764_000_000_000,
        seq=123_456,
        payload=bytes(1024),
    )
    return len(encode(envelope))


def test_bench_codec_json_has_the_documented_keys() -> None:
    out = subprocess.run(
        [P2PR, "bench", "codec", "--json", "--messages", "2000", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: the JSON line only, no table
    result = json.loads(lines[0])
    assert set(result) == CODEC_KEYS
    assert result["messages"] == 2000  # as asked
    assert result["repeats"] == 3
    assert result["wire_bytes_per_1kib"] == one_kib_wire_size()
    for key in TIMED_CODEC_KEYS:
        low, high = result[f"{key}_spread"]
        assert 0 < low <= result[key] <= high, key


def test_bench_codec_prints_a_table_and_json() -> None:
    out = subprocess.run(
        [P2PR, "bench", "codec", "--messages", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    table = out.stdout.strip().splitlines()[:-1]

    def shown(key: str, digits: int) -> str:
        """A median as the table shows it, with its spread (min–max) when there is one."""
        low, high = result[f"{key}_spread"]
        spread = "" if low == high else f" ({low:.{digits}f}–{high:.{digits}f})"
        return f"{result[key]:.{digits}f}{spread}"

    # The table shows what the JSON says, each measure on its row.
    expected_rows = {
        "encode+checksum+decode, 1 KiB message": f"{shown('encode_decode_us_per_1kib', 2)} µs",
        "encode alone": f"{shown('encode_us_per_1kib', 2)} µs",
        "decode (verify) alone": f"{shown('decode_us_per_1kib', 2)} µs",
        "wire size of a 1 KiB message": f"{one_kib_wire_size()} B",
        "xxh3-64 over 1 MiB": f"{shown('checksum_gb_per_s', 1)} GB/s",
    }
    for measure, value in expected_rows.items():
        [row] = [line for line in table if measure in line]
        assert value in row, (measure, row)


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
