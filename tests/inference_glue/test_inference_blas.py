"""Node processes use OpenBLAS with a fixed thread count, and stay bit-exact under it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from inference_glue.blas import (
    DEFAULT_BLAS_THREADS,
    blas_in_use,
    find_openblas,
    node_environment,
)

REPORT = textwrap.dedent(
    """
    import json
    from inference_glue.blas import blas_in_use
    report = blas_in_use()
    print(json.dumps({"kind": report.kind, "library": report.library, "threads": report.threads}))
    """
)

# Under the node environment: the pipelined run still equals the single-process one.
PIPELINE_UNDER_OPENBLAS = textwrap.dedent(
    """
    import sys
    import mlx_lm
    from inference_glue.blas import blas_in_use
    from inference_glue.local_pipeline import generate_pipelined, generate_single
    from inference_glue.tiny_model import build_tiny_model
    source = mlx_lm.load(str(build_tiny_model(sys.argv[1], seed=2)))[:2]
    for kwargs in ({}, {"seed": 5, "temp": 1.0}):
        single = generate_single(source, "The capital of France is", 16, **kwargs)
        split = generate_pipelined(source, "The capital of France is", [range(0, 4), range(4, 6)], 16, **kwargs)
        assert split.token_ids == single.token_ids, kwargs
    print(blas_in_use().kind)
    """
)


def run_python(code: str, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_openblas_is_installed() -> None:
    # scripts/setup.sh and CI install Debian's libopenblas0-pthread.
    assert find_openblas() is not None


def test_node_environment_preloads_openblas_once_and_fixes_threads() -> None:
    library = str(find_openblas())
    env = node_environment({"PATH": "/bin", "LD_PRELOAD": "/opt/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{library} /opt/libfoo.so"
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == str(DEFAULT_BLAS_THREADS)
    assert env["PATH"] == "/bin"
    assert node_environment(env) == env
    assert node_environment({}, threads=2)["OPENBLAS_NUM_THREADS"] == "2"
    plain = node_environment({}, openblas=False)
    assert "LD_PRELOAD" not in plain and plain["OPENBLAS_NUM_THREADS"] == "1"
    assert node_environment(env, openblas=False)["LD_PRELOAD"] == "/opt/libfoo.so"


def test_blas_report_in_node_and_plain_processes() -> None:
    node = json.loads(run_python(REPORT, node_environment()))
    assert node["kind"] == "openblas" and "openblas" in node["library"]
    assert node["threads"] == str(DEFAULT_BLAS_THREADS)
    plain = json.loads(run_python(REPORT, node_environment(openblas=False)))
    assert plain["kind"] == "reference" and "mlx" in plain["library"]
    assert blas_in_use().kind in ("openblas", "reference")


def test_pipeline_is_bit_exact_under_openblas(tmp_path: Path) -> None:
    out = run_python(PIPELINE_UNDER_OPENBLAS, node_environment(), str(tmp_path))
    assert out.strip() == "openblas"
