"""The single-process reference, in a process of its own with the nodes' BLAS set-up.

    echo '[{"prompt_ids": [1, 2, 3], "max_tokens": 16}]' | \\
        python -m inference_glue.reference --model DIR [--warmup]

Runs mlx-lm's own `stream_generate` over the whole model for each case read as a JSON list
from standard input (fields: prompt_ids, max_tokens, and optionally temp, top_p, seed,
prefill_step_size), exactly as `local_pipeline.generate_single` does (greedy: mlx-lm's
argmax sampler; seeded: `PositionalSampler` as `sampler=`), and prints one JSON line per case:
token ids, text, finish reason, time to first token and total time.

Bit-exact comparison with a pipeline needs the same BLAS and thread count as its nodes, and
the process that runs `p2pr verify` may have neither; `run_reference` therefore starts this
module with `blas.node_environment()`, as `StageCluster` starts the nodes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference_glue.blas import node_environment

__all__ = ["ReferenceError", "ReferenceServer", "main", "run_reference"]


class ReferenceError(RuntimeError):
    """The reference process failed."""


def run_reference(
    model_dir: str | Path,
    cases: Sequence[dict[str, Any]],
    *,
    warmup: bool = False,
    timeout: float = 1800.0,
) -> list[dict[str, Any]]:
    """Run `cases` through mlx-lm in a child process with the nodes' environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "inference_glue.reference", f"--model={model_dir}"]
        + (["--warmup"] if warmup else []),
        input=json.dumps(list(cases)),
        capture_output=True,
        text=True,
        env=node_environment(),
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise ReferenceError(
            f"the single-process reference failed (status {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}"
        )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(cases):
        raise ReferenceError(f"the reference printed {len(results)} results for {len(cases)}")
    return results


class ReferenceServer:
    """A long-lived reference process (model loaded once) that runs one case at a time:
    for benchmarks, which time each run (warm-up and timed runs share one load)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_glue.reference", f"--model={model_dir}", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=node_environment(),
        )
        self._read()  # the ready line

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result
        assert self.proc.stderr is not None
        raise ReferenceError(
            f"the reference process ended (status {self.proc.wait()}): "
            f"{self.proc.stderr.read().strip()[-2000:]}"
        )

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        """Run one case; its result."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """End the process."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ReferenceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _generate(model: Any, tokenizer: Any, case: dict[str, Any]) -> dict[str, Any]:
    from mlx_lm.generate import stream_generate

    from inference_glue.local_pipeline import DEFAULT_PREFILL_STEP_SIZE
    from inference_glue.sampling import PositionalSampler, SamplingParams

    prompt_ids = [int(t) for t in case["prompt_ids"]]
    params = SamplingParams(
        temp=float(case.get("temp", 0.0)),
        top_p=float(case.get("top_p", 1.0)),
        seed=case.get("seed"),
    )
    sampler = None if params.greedy else PositionalSampler(params, len(prompt_ids))
    tokens: list[int] = []
    texts: list[str] = []
    finish = None
    start = time.perf_counter()
    first = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt_ids,
        int(case["max_tokens"]),
        sampler=sampler,
        prefill_step_size=int(case.get("prefill_step_size", DEFAULT_PREFILL_STEP_SIZE)),
    ):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(response.token))
        texts.append(response.text)
        finish = response.finish_reason
    end = time.perf_counter()
    return {
        "token_ids": tokens,
        "text": "".join(texts),
        "finish_reason": finish,
        "ttft_s": (first or end) - start,
        "elapsed_s": end - start,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m inference_glue.reference`."""
    parser = argparse.ArgumentParser(prog="python -m inference_glue.reference")
    parser.add_argument("--model", required=True)
    parser.add_argument("--warmup", action="store_true", help="one untimed run first")
    parser.add_argument(
        "--serve", action="store_true", help="one JSON case per stdin line, until EOF"
    )
    args = parser.parse_args(argv)

    import mlx_lm

    from inference_glue.blas import blas_in_use

    model, tokenizer = mlx_lm.load(args.model)[:2]
    blas = blas_in_use()
    if args.serve:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            result = _generate(model, tokenizer, json.loads(line))
            result["blas"] = blas.kind
            result["blas_threads"] = blas.threads
            print(json.dumps(result), flush=True)
        return
    cases = json.loads(sys.stdin.read())
    if args.warmup and cases:
        _generate(model, tokenizer, cases[0])
    for case in cases:
        result = _generate(model, tokenizer, case)
        result["blas"] = blas.kind
        result["blas_threads"] = blas.threads
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
