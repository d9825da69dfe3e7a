"""The single-process reference, in a process of its own with the nodes' BLAS set-up.

    echo '[{"prompt_ids": [1, 2, 3], "max_tokens": 16}]' | \\
        python -m p2pr.reference --model DIR [--warmup]

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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inference_glue.blas import node_environment

from .launch import Launched, LaunchError, print_event, python_module

__all__ = ["ReferenceError", "ReferenceServer", "main", "run_reference"]

MODULE = "p2pr.reference"


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
    args = [f"--model={model_dir}", *(["--warmup"] if warmup else [])]
    end = time.monotonic() + timeout
    with Launched(
        python_module(MODULE, *args), label="the single-process reference", env=node_environment()
    ) as process:
        process.send(json.dumps(list(cases)))
        process.close_stdin()
        try:
            return [process.read(end - time.monotonic()) for _ in cases]
        except LaunchError as exc:
            raise ReferenceError(str(exc)) from None


class ReferenceServer:
    """A long-lived reference process (model loaded once) that runs one case at a time:
    for benchmarks, which time each run (warm-up and timed runs share one load)."""

    def __init__(self, model_dir: str | Path, timeout: float = 600.0) -> None:
        self.timeout = timeout
        self.process = Launched(
            python_module(MODULE, f"--model={model_dir}", "--serve"),
            label="the reference process",
            env=node_environment(),
        )
        self._wait(lambda: self.process.expect("ready", self.timeout))

    def _wait(self, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return read()
        except LaunchError as exc:
            raise ReferenceError(str(exc)) from None

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        """Run one case; its result."""
        self.process.send(case)
        return self._wait(lambda: self.process.read(self.timeout))

    def close(self) -> None:
        """End the process."""
        self.process.stop(timeout=30, terminate=False)

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
    """Entry point: `python -m p2pr.reference`."""
    parser = argparse.ArgumentParser(prog="python -m p2pr.reference")
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
        print_event("ready")
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
