"""`p2pr verify`: the distributed pipeline against mlx-lm's own single-process generation.

The same prompts go through mlx-lm's `stream_generate` in one process (`reference`, with the
nodes' BLAS set-up) and through a pipeline of N stage node processes, greedy and seeded, one
case with chunked prefill; the pipeline runs every case concurrently (several requests in
flight). Each row says whether the token ids are identical and, if not, the first position
where they differ; a request that fails is a row with its error (stage and peer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import anyio
import attrs

from inference_glue.client import GenerationResult, PipelineClient, load_tokenizer
from inference_glue.local_pipeline import DEFAULT_PREFILL_STEP_SIZE, prompt_token_ids
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster

__all__ = [
    "CHECK_TOKENS",
    "VerifyCase",
    "check_first_tokens",
    "default_cases",
    "first_divergence",
    "run_cases",
    "run_cases_or_errors",
    "run_verify",
]

PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "def forward(self, x):",
)
LONG_PROMPT = (
    "A reliable channel delivers every message exactly once, in order, and never corrupted. "
    "Each node runs a contiguous range of layers; hidden states travel between the stages."
)


@attrs.frozen
class VerifyCase:
    """One prompt with one way of sampling."""

    name: str
    prompt: str
    mode: str
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE


def default_cases() -> list[VerifyCase]:
    """Each prompt greedy and seeded, one seeded with top-p, one with chunked prefill."""
    cases = []
    for prompt in PROMPTS:
        cases.append(VerifyCase(prompt, prompt, "greedy"))
        cases.append(VerifyCase(prompt, prompt, "seeded", temp=0.8, seed=1234))
    cases.append(VerifyCase(PROMPTS[1], PROMPTS[1], "seeded top-p", temp=1.0, top_p=0.9, seed=7))
    cases.append(
        VerifyCase(
            "long prompt", LONG_PROMPT, "greedy, prefill in pieces of 8", prefill_step_size=8
        )
    )
    return cases


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where `a` and `b` differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


async def run_cases(
    client: PipelineClient,
    requests: Sequence[dict[str, Any]],
    *,
    concurrent: bool = True,
) -> list[GenerationResult]:
    """Run request dicts (prompt_ids, max_tokens, temp, top_p, seed, prefill_step_size)."""
    results: list[GenerationResult | None] = [None] * len(requests)

    async def one(i: int) -> None:
        r = dict(requests[i])
        results[i] = await client.generate(r.pop("prompt_ids"), r.pop("max_tokens"), **r)

    if concurrent:
        async with anyio.create_task_group() as tg:
            for i in range(len(requests)):
                tg.start_soon(one, i)
    else:
        for i in range(len(requests)):
            await one(i)
    return [r for r in results if r is not None]


async def run_cases_or_errors(
    client: PipelineClient, requests: Sequence[dict[str, Any]]
) -> list[GenerationResult | str]:
    """`run_cases`, all at once, where a request that fails gives its one-line error (which
    names the stage and peer, e.g. `StageFailedError`) instead of ending the others."""
    results: list[GenerationResult | str] = ["not run"] * len(requests)

    async def one(i: int) -> None:
        r = dict(requests[i])
        try:
            results[i] = await client.generate(r.pop("prompt_ids"), r.pop("max_tokens"), **r)
        except Exception as exc:  # any failure of one request is that request's row
            results[i] = f"{type(exc).__name__}: {exc}".splitlines()[0]

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return results


def _row(
    case: VerifyCase, prompt_tokens: int, ref: dict[str, Any], got: GenerationResult | str
) -> dict[str, Any]:
    error = got if isinstance(got, str) else None
    tokens: Sequence[int] = () if isinstance(got, str) else got.token_ids
    divergence = first_divergence(ref["token_ids"], tokens)
    return {
        "prompt": case.name,
        "mode": case.mode,
        "temp": case.temp,
        "top_p": case.top_p,
        "seed": case.seed,
        "prefill_step_size": case.prefill_step_size,
        "prompt_tokens": prompt_tokens,
        "reference_tokens": len(ref["token_ids"]),
        "pipeline_tokens": len(tokens),
        "identical": error is None and divergence is None,
        "first_divergence": divergence,
        "text_identical": not isinstance(got, str) and ref["text"] == got.text,
        "finish_reason": None if isinstance(got, str) else got.finish_reason,
        "text": "" if isinstance(got, str) else got.text,
        "error": error,
    }


# Tokens of an untested architecture's output that `p2pr generate` checks.
CHECK_TOKENS = 16


def check_first_tokens(
    model_dir: Path, request: dict[str, Any], token_ids: Sequence[int], count: int = CHECK_TOKENS
) -> tuple[int, int | None]:
    """The first `count` of `token_ids`, generated by a pipeline for `request` (prompt_ids,
    temp, top_p, seed, prefill_step_size), against mlx-lm's single-process generation (in a
    process with the nodes' BLAS set-up): (tokens checked, first divergence or None)."""
    got = list(token_ids[:count])
    expected = run_reference(model_dir, [{**request, "max_tokens": max(1, len(got))}])[0]
    return len(got), first_divergence(expected["token_ids"][: len(got)], got)


def run_verify(
    model_dir: Path,
    nodes: int,
    max_tokens: int,
    *,
    cases: Sequence[VerifyCase] | None = None,
    model_label: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every case both ways; the JSON-ready result (`all_identical` sums it up)."""
    say = progress or (lambda _: None)
    cases = list(cases or default_cases())
    tokenizer = load_tokenizer(model_dir)
    requests = [
        {
            "prompt_ids": prompt_token_ids(tokenizer, case.prompt),
            "max_tokens": max_tokens,
            "temp": case.temp,
            "top_p": case.top_p,
            "seed": case.seed,
            "prefill_step_size": case.prefill_step_size,
        }
        for case in cases
    ]
    say(f"single process: mlx-lm stream_generate, {len(cases)} cases")
    start = time.perf_counter()
    reference = run_reference(model_dir, requests)
    reference_s = time.perf_counter() - start

    async def distributed(
        cluster: StageCluster,
    ) -> tuple[list[GenerationResult | str], list[str]]:
        async with PipelineClient.connect(cluster.addrs, model_dir) as client:
            results = await run_cases_or_errors(client, requests)
            return results, [s.label for s in client.stages]

    say(f"pipeline: {nodes} stage processes, {len(cases)} requests in flight at once")
    start = time.perf_counter()
    with StageCluster(model_dir, nodes).start(progress=say) as cluster:
        results, stages = anyio.run(distributed, cluster)
        layers = [[n.layers.start, n.layers.stop] for n in cluster.nodes]
    pipeline_s = time.perf_counter() - start

    rows = [
        _row(case, len(cast(list[int], request["prompt_ids"])), ref, got)
        for case, request, ref, got in zip(cases, requests, reference, results)
    ]
    return {
        "model": model_label or model_dir.name,
        "model_dir": str(model_dir),
        "stages": nodes,
        "layers": layers,
        "stage_nodes": stages,
        "max_tokens": max_tokens,
        "blas": f"{reference[0]['blas']} x{reference[0]['blas_threads']}" if reference else None,
        "rows": rows,
        "all_identical": all(row["identical"] for row in rows),
        "reference_seconds": round(reference_s, 2),
        "pipeline_seconds": round(pipeline_s, 2),
    }
