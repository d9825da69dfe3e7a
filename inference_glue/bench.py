"""`p2pr bench generate`: single-process mlx-lm against 2- and 3-stage pipelines.

One prompt, greedy, `max_tokens` tokens. Three configurations run side by side: mlx-lm's
`stream_generate` in one process (a long-lived `ReferenceServer` with the nodes' BLAS set-up:
OpenBLAS, one thread), and pipelines of 2 and 3 stage node processes on 127.0.0.1, each driven
by a `PipelineClient`. After one warm-up run each, the timed runs are interleaved (single,
2 stages, 3 stages, single, ...) so that a machine whose load drifts treats them alike.

Reported per configuration (medians over the runs): decode tokens/s (tokens after the first,
per second from the first to the last), time to first token, end-to-end tokens/s; for the
pipelines also the stages' own compute time per token and the messaging time per token (what
the first stage waits for each token beyond the other stages' compute: hops, queues).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import anyio

from inference_glue.client import GenerationResult, PipelineClient, load_tokenizer
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
    decode = [(n - 1) / (e - t) for t, e, n in runs if n > 1 and e > t]
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
    downstream = sum(compute[n] for n in names[1:])
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
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready result.

    `concurrent`: afterwards, each pipeline also serves that many requests at once, for its
    aggregate tokens/s (stages work on different requests at the same time); the single
    process serves requests one after another (its end-to-end tokens/s). 0 skips it.
    """
    say = progress or (lambda _: None)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    case = {"prompt_ids": prompt_ids, "max_tokens": max_tokens}

    with ExitStack() as stack:
        say("single process: loading the model")
        reference = stack.enter_context(ReferenceServer(model_dir))
        clusters = {}
        for count in stage_counts:
            cluster = StageCluster(model_dir, count, compute=compute)
            clusters[count] = stack.enter_context(cluster.start(progress=say))

        async def measure() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            async with AsyncExitStack() as astack:
                clients = {
                    count: await astack.enter_async_context(
                        PipelineClient.connect(cluster.addrs, model_dir, chunks=chunks)
                    )
                    for count, cluster in clusters.items()
                }
                say("warm-up: one run of each")
                await anyio.to_thread.run_sync(reference.run, case)
                for client in clients.values():
                    await client.generate(prompt_ids, max_tokens)
                before = {count: await c.stats() for count, c in clients.items()}
                singles: list[dict[str, Any]] = []
                piped: dict[int, list[GenerationResult]] = {count: [] for count in clients}
                for run in range(runs):
                    say(f"timed run {run + 1} of {runs}: single, then each pipeline")
                    singles.append(await anyio.to_thread.run_sync(reference.run, case))
                    for count, client in clients.items():
                        piped[count].append(await client.generate(prompt_ids, max_tokens))
                after = {count: await c.stats() for count, c in clients.items()}
                aggregate: dict[int, float] = {}
                for count, client in clients.items():
                    if concurrent < 1:
                        break
                    say(f"{concurrent} requests at once through {count} stages")
                    start = time.perf_counter()
                    together = await run_cases(client, [case] * concurrent, concurrent=True)
                    wall = time.perf_counter() - start
                    aggregate[count] = sum(len(r.token_ids) for r in together) / wall
            reference_ids = singles[0]["token_ids"]
            rows = [
                _row(
                    "single process (mlx-lm)",
                    1,
                    [(r["ttft_s"], r["elapsed_s"], len(r["token_ids"])) for r in singles],
                    all(r["token_ids"] == reference_ids for r in singles),
                )
            ]
            for count, results in piped.items():
                row = _row(
                    f"{count}-stage pipeline",
                    count,
                    [(r.ttft_s, r.elapsed_s, len(r.token_ids)) for r in results],
                    all(list(r.token_ids) == reference_ids for r in results),
                )
                tokens = sum(len(r.token_ids) for r in results)
                row.update(_pipeline_costs(count, before[count], after[count], tokens))
                if count in aggregate:
                    row["concurrent_requests"] = concurrent
                    row["aggregate_tokens_per_s"] = round(aggregate[count], 2)
                row["layers"] = [[n.layers.start, n.layers.stop] for n in clusters[count].nodes]
                rows.append(row)
            return rows, singles

        rows, singles = anyio.run(measure)
    rows[0]["concurrent_requests"] = 1
    rows[0]["aggregate_tokens_per_s"] = rows[0]["e2e_tokens_per_s"]

    base = rows[0]["decode_tokens_per_s"]
    for row in rows:
        value = row["decode_tokens_per_s"]
        row["vs_single"] = round(value / base, 3) if value and base else None
    two = next((r for r in rows if r["stages"] == 2), None)
    return {
        "model": model_dir.name,
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "max_tokens": max_tokens,
        "runs": runs,
        "compute_mode": compute,
        "chunk_delivery": chunks,
        "blas": f"{singles[0]['blas']} x{singles[0]['blas_threads']}",
        "rows": rows,
        "goal": f"2-stage decode tokens/s >= {GOAL_2_STAGE} x single process",
        "goal_met": bool(two and two["vs_single"] is not None and two["vs_single"] >= GOAL_2_STAGE),
    }
