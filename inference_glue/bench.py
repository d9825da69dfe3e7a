"""`p2pr bench generate`: single-process mlx-lm against 2- and 3-stage pipelines.

One prompt, greedy, `max_tokens` tokens. Each configuration runs alone, with only its own
processes alive: mlx-lm's `stream_generate` in one process (a `ReferenceServer` with the nodes'
BLAS set-up: OpenBLAS, one thread), then pipelines of 2 and 3 stage node processes on
127.0.0.1, each driven by a `PipelineClient`, then the single process again. Why alone: on one
machine every live process competes for the cores and the shared last-level cache, and idle
nodes are not free (heartbeats, health sharing); an earlier version kept all three
configurations alive and interleaved their runs, which charged each one for the others' idle
processes (about 0.5 tokens/s off the 2-stage pipeline here). Measuring the single process
before and after the pipelines shows whether the machine's load drifted meanwhile
(`single_drift`, the relative change of its decode tokens/s); the single row uses both.

Reported per configuration (medians over the runs, after one warm-up run): decode tokens/s
(tokens after the first, per second from the first to the last), time to first token,
end-to-end tokens/s; for the pipelines also the stages' own compute time per token and the
messaging time per token (what the first stage waits for each token beyond the other stages'
compute: hops, queues).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.cluster import StageCluster
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.reference import ReferenceServer
from inference_glue.verify import run_cases

__all__ = ["DEFAULT_PROMPT", "GOAL_2_STAGE", "bench_generate"]

DEFAULT_PROMPT = "Once upon a time"
# 2 stages must reach this fraction of the single process's decode tokens/s.
GOAL_2_STAGE = 0.95


def _row(
    name: str,
    stages: int,
    runs: Sequence[tuple[float, float, int]],
    identical: bool,
) -> dict[str, Any]:
    """runs: (ttft_s, elapsed_s, tokens) per run."""
    decode = _decode_rates(runs)
    return {
        "config": name,
        "stages": stages,
        "tokens": runs[0][2] if runs else 0,
        "decode_tokens_per_s": round(statistics.median(decode), 2) if decode else None,
        "ttft_ms": round(statistics.median(t for t, _, _ in runs) * 1000, 1),
        "e2e_tokens_per_s": round(statistics.median(n / e for _, e, n in runs), 2),
        "decode_tokens_per_s_runs": [round(d, 2) for d in decode],
        "ttft_ms_runs": [round(t * 1000, 1) for t, _, _ in runs],
        "identical_to_single": identical,
    }


def _work(stats: dict[str, Any], name: str, key: str) -> float:
    return float(next(n for n in stats["nodes"] if n["name"] == name)["work"][key])


def _pipeline_costs(
    count: int, before: dict[str, Any], after: dict[str, Any], tokens: int
) -> dict[str, Any]:
    names = [f"stage {i}" for i in range(count)]
    compute = {
        n: _work(after, n, "compute_seconds") - _work(before, n, "compute_seconds") for n in names
    }
    trips = _work(after, "stage 0", "round_trips") - _work(before, "stage 0", "round_trips")
    waited = _work(after, "stage 0", "round_trip_seconds") - _work(
        before, "stage 0", "round_trip_seconds"
    )
    # With a split LM head, stage 0 also computes its part of it inside that round trip.
    head = _work(after, "stage 0", "head_seconds") - _work(before, "stage 0", "head_seconds")
    downstream = sum(compute[n] for n in names[1:]) + head
    return {
        "compute_ms_per_token": round(sum(compute.values()) / tokens * 1000, 2),
        "stage_compute_ms_per_token": [round(compute[n] / tokens * 1000, 2) for n in names],
        # Stage 0 times each token's round trip (hidden state out, token back); what the
        # other stages did not spend computing is messaging: hops, queues, scheduling.
        "messaging_ms_per_token": round((waited - downstream) / trips * 1000, 2) if trips else None,
    }


def bench_generate(
    model_dir: Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 64,
    runs: int = 3,
    stage_counts: Sequence[int] = (2, 3),
    compute: str = "inline",
    chunks: str = "direct",
    concurrent: int = 4,
    split_head: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready result.

    `concurrent`: each pipeline also serves that many requests at once, for its aggregate
    tokens/s (stages work on different requests at the same time); the single process
    serves requests one after another (its end-to-end tokens/s). 0 skips it.
    `split_head`: the pipelines' first and last stages share the LM head (see
    `RequestMeta.head_split`); False: the last stage computes all of it.
    """
    say = progress or (lambda _: None)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    case = {"prompt_ids": prompt_ids, "max_tokens": max_tokens}

    def single(when: str) -> list[dict[str, Any]]:
        say(f"single process ({when}): loading the model")
        with ReferenceServer(model_dir) as reference:
            say(f"single process ({when}): warm-up, then {runs} timed runs")
            reference.run(case)
            return [reference.run(case) for _ in range(runs)]

    def pipeline(count: int) -> dict[str, Any]:
        with StageCluster(model_dir, count, compute=compute).start(progress=say) as cluster:

            async def measure() -> dict[str, Any]:
                async with PipelineClient.connect(
                    cluster.addrs, model_dir, chunks=chunks, split_head=split_head
                ) as c:
                    say(f"{count} stages: warm-up, then {runs} timed runs")
                    await c.generate(prompt_ids, max_tokens)
                    before = await c.stats()
                    results = [await c.generate(prompt_ids, max_tokens) for _ in range(runs)]
                    after = await c.stats()
                    aggregate = None
                    if concurrent >= 1:
                        say(f"{count} stages: {concurrent} requests at once")
                        start = time.perf_counter()
                        together = await run_cases(c, [case] * concurrent, concurrent=True)
                        wall = time.perf_counter() - start
                        aggregate = sum(len(r.token_ids) for r in together) / wall
                return {
                    "results": results,
                    "costs": _pipeline_costs(
                        count, before, after, sum(len(r.token_ids) for r in results)
                    ),
                    "aggregate": aggregate,
                    "head_split": next(
                        (
                            n["work"].get("head_split")
                            for n in after["nodes"]
                            if n["name"] == f"stage {count - 1}"
                        ),
                        None,
                    ),
                    "layers": [[n.layers.start, n.layers.stop] for n in cluster.nodes],
                }

            return anyio.run(measure)

    first = single("before the pipelines")
    piped = {count: pipeline(count) for count in stage_counts}
    last = single("after the pipelines")
    singles = first + last
    reference_ids = singles[0]["token_ids"]

    rows = [
        _row(
            "single process (mlx-lm)",
            1,
            _single_timings(singles),
            all(r["token_ids"] == reference_ids for r in singles),
        )
    ]
    rows[0]["concurrent_requests"] = 1
    rows[0]["aggregate_tokens_per_s"] = rows[0]["e2e_tokens_per_s"]
    for count, measured in piped.items():
        results = measured["results"]
        row = _row(
            f"{count}-stage pipeline",
            count,
            [(r.ttft_s, r.elapsed_s, len(r.token_ids)) for r in results],
            all(list(r.token_ids) == reference_ids for r in results),
        )
        row.update(measured["costs"])
        # Where the last stage's tuner left the cut of the LM head (None: not split).
        row["head_split"] = measured["head_split"]
        if measured["aggregate"] is not None:
            row["concurrent_requests"] = concurrent
            row["aggregate_tokens_per_s"] = round(measured["aggregate"], 2)
        row["layers"] = measured["layers"]
        rows.append(row)

    base = rows[0]["decode_tokens_per_s"]
    for row in rows:
        value = row["decode_tokens_per_s"]
        row["vs_single"] = round(value / base, 3) if value and base else None
    two = next((r for r in rows if r["stages"] == 2), None)
    before_rate, after_rate = (_median_decode(_single_timings(part)) for part in (first, last))
    return {
        "model": model_dir.name,
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "max_tokens": max_tokens,
        "runs": runs,
        "method": "each configuration alone; single process before and after the pipelines",
        "compute_mode": compute,
        "chunk_delivery": chunks,
        "split_head": split_head,
        "blas": f"{singles[0]['blas']} x{singles[0]['blas_threads']}",
        "single_drift": round(after_rate / before_rate - 1, 3)
        if before_rate and after_rate
        else None,
        "rows": rows,
        "goal": f"2-stage decode tokens/s >= {GOAL_2_STAGE} x single process",
        "goal_met": bool(two and two["vs_single"] is not None and two["vs_single"] >= GOAL_2_STAGE),
    }


def _decode_rates(runs: Sequence[tuple[float, float, int]]) -> list[float]:
    """Tokens after the first, per second from the first to the last, per run."""
    return [(n - 1) / (e - t) for t, e, n in runs if n > 1 and e > t]


def _median_decode(runs: Sequence[tuple[float, float, int]]) -> float | None:
    rates = _decode_rates(runs)
    return statistics.median(rates) if rates else None


def _single_timings(runs: Sequence[dict[str, Any]]) -> list[tuple[float, float, int]]:
    return [(r["ttft_s"], r["elapsed_s"], len(r["token_ids"])) for r in runs]
