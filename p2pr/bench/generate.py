"""`p2pr bench generate`: single-process mlx-lm against 2- and 3-stage pipelines.

One prompt, greedy, `max_tokens` tokens. Each configuration runs alone, with only its own
processes alive: mlx-lm's `stream_generate` in one process (a `ReferenceServer` with the nodes'
BLAS set-up: OpenBLAS, one thread), then pipelines of 2 and 3 stage node processes on
127.0.0.1, each driven by a `PipelineClient`. Why alone: on one machine every live process
competes for the cores and the shared last-level cache, and idle nodes are not free
(heartbeats, health sharing); an earlier version kept all three configurations alive and
interleaved their runs, which charged each one for the others' idle processes (about 0.5
tokens/s off the 2-stage pipeline here). Instead the configurations take turns for `repeats`
rounds (`p2pr.bench.repeats`), so that a drift in the machine's load falls on each of them;
`single_drift` is the relative change of the single process's decode tokens/s from the first
round to the last.

Reported per configuration (in each round the median over its runs, after one warm-up run;
then the median over the rounds and the spread): decode tokens/s
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
import attrs

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.local_pipeline import prompt_token_ids
from inference_glue.tokens import decode_rate
from p2pr.bench.repeats import DEFAULT_REPEATS, run_interleaved, summarize
from p2pr.reference import ReferenceServer
from p2pr.stage_cluster import StageCluster
from p2pr.verify import run_cases

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


@attrs.frozen
class _Setup:
    """What every measured configuration runs."""

    model_dir: Path
    prompt_ids: list[int]
    max_tokens: int
    runs: int
    compute: str
    chunks: str
    concurrent: int
    split_head: bool
    say: Callable[[str], None]

    @property
    def case(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "max_tokens": self.max_tokens}


# The figures of a row: medians over the rounds, each with a `_spread`. `vs_single` is the
# median of each round's ratio, so that a drift in load between rounds cancels out.
ROW_FIGURES = (
    "decode_tokens_per_s",
    "ttft_ms",
    "e2e_tokens_per_s",
    "compute_ms_per_token",
    "messaging_ms_per_token",
    "aggregate_tokens_per_s",
    "vs_single",
)


def bench_generate(
    model_dir: Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 64,
    runs: int = 3,
    repeats: int = DEFAULT_REPEATS,
    stage_counts: Sequence[int] = (2, 3),
    compute: str = "thread",
    chunks: str = "direct",
    concurrent: int = 4,
    split_head: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready result.

    `repeats` rounds, each running the single process and then every pipeline, each alone,
    with a warm-up and `runs` timed runs; every figure is the median over the rounds.
    `concurrent`: each pipeline also serves that many requests at once, for its aggregate
    tokens/s (stages work on different requests at the same time); the single process
    serves requests one after another (its end-to-end tokens/s). 0 skips it.
    `split_head`: the pipelines' first and last stages share the LM head (see
    `RequestMeta.head_split`); False: the last stage computes all of it.
    """
    prompt_ids = prompt_token_ids(load_tokenizer(model_dir), prompt)
    setup = _Setup(
        model_dir,
        prompt_ids,
        max_tokens,
        runs,
        compute,
        chunks,
        concurrent,
        split_head,
        progress or (lambda _: None),
    )
    configs = [1, *stage_counts]

    def measure(count: int, _round: int) -> Any:
        # The single process: its runs; a pipeline: its runs and costs.
        return _single(setup) if count == 1 else _pipeline(setup, count)

    measured = run_interleaved(
        configs,
        repeats,
        measure,
        setup.say,
        lambda count: "single process" if count == 1 else f"{count} stages",
    )
    singles: list[list[dict[str, Any]]] = measured[0]
    reference_ids = singles[0][0]["token_ids"]
    rounds = [
        _rows(
            setup, singles[i], dict(zip(stage_counts, (m[i] for m in measured[1:]))), reference_ids
        )
        for i in range(repeats)
    ]
    rows = [_merge_rounds([r[index] for r in rounds]) for index in range(len(configs))]
    two = next((r for r in rows if r["stages"] == 2), None)
    before_rate, after_rate = (
        _median_decode(_single_timings(part)) for part in (singles[0], singles[-1])
    )
    return {
        "model": model_dir.name,
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "max_tokens": max_tokens,
        "runs": runs,
        "repeats": repeats,
        "method": f"{repeats} rounds, each configuration alone in each, interleaved; "
        "medians over the rounds",
        "compute_mode": compute,
        "chunk_delivery": chunks,
        "split_head": split_head,
        "blas": f"{singles[0][0]['blas']} x{singles[0][0]['blas_threads']}",
        "single_drift": round(after_rate / before_rate - 1, 3)
        if repeats > 1 and before_rate and after_rate
        else None,
        "rows": rows,
        "goal": f"2-stage decode tokens/s >= {GOAL_2_STAGE} x single process",
        "goal_met": bool(two and two["vs_single"] is not None and two["vs_single"] >= GOAL_2_STAGE),
    }


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rows of every round: medians, spreads, every run, one verdict."""
    row = summarize(rounds, ROW_FIGURES, digits=3)
    for key in ("decode_tokens_per_s_runs", "ttft_ms_runs"):
        row[key] = [value for r in rounds for value in r[key]]
    row["identical_to_single"] = all(r["identical_to_single"] for r in rounds)
    return row


def _single(setup: _Setup) -> list[dict[str, Any]]:
    """The single process: a warm-up, then `runs` timed runs."""
    setup.say("single process: loading the model")
    with ReferenceServer(setup.model_dir) as reference:
        setup.say(f"single process: warm-up, then {setup.runs} timed runs")
        reference.run(setup.case)
        return [reference.run(setup.case) for _ in range(setup.runs)]


def _pipeline(setup: _Setup, count: int) -> dict[str, Any]:
    """A pipeline of `count` stages, alone on the machine: its runs and costs."""
    cluster = StageCluster(setup.model_dir, count, compute=setup.compute)
    with cluster.start(progress=setup.say):
        measured: dict[str, Any] = anyio.run(_pipeline_runs, setup, cluster, count)
        measured["layers"] = [[n.layers.start, n.layers.stop] for n in cluster.nodes]
        return measured


async def _pipeline_runs(setup: _Setup, cluster: StageCluster, count: int) -> dict[str, Any]:
    async with PipelineClient.connect(
        cluster.addrs, setup.model_dir, chunks=setup.chunks, split_head=setup.split_head
    ) as client:
        setup.say(f"{count} stages: warm-up, then {setup.runs} timed runs")
        await client.generate(setup.prompt_ids, setup.max_tokens)
        before = await client.stats()
        results = [
            await client.generate(setup.prompt_ids, setup.max_tokens) for _ in range(setup.runs)
        ]
        after = await client.stats()
        aggregate = None
        if setup.concurrent >= 1:
            setup.say(f"{count} stages: {setup.concurrent} requests at once")
            start = time.perf_counter()
            together = await run_cases(client, [setup.case] * setup.concurrent, concurrent=True)
            aggregate = sum(len(r.token_ids) for r in together) / (time.perf_counter() - start)
    last_stage = next((n for n in after["nodes"] if n["name"] == f"stage {count - 1}"), None)
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "results": results,
        "costs": _pipeline_costs(count, before, after, tokens),
        "aggregate": aggregate,
        "head_split": last_stage["work"].get("head_split") if last_stage else None,
    }


def _rows(
    setup: _Setup,
    singles: list[dict[str, Any]],
    piped: dict[int, dict[str, Any]],
    reference_ids: list[int],
) -> list[dict[str, Any]]:
    """One round's rows, the single process first, each against it and `reference_ids`."""
    single = _row(
        "single process (mlx-lm)",
        1,
        _single_timings(singles),
        all(r["token_ids"] == reference_ids for r in singles),
    )
    single["concurrent_requests"] = 1
    single["aggregate_tokens_per_s"] = single["e2e_tokens_per_s"]
    rows = [single]
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
            row["concurrent_requests"] = setup.concurrent
            row["aggregate_tokens_per_s"] = round(measured["aggregate"], 2)
        row["layers"] = measured["layers"]
        rows.append(row)
    base = single["decode_tokens_per_s"]
    for row in rows:
        value = row["decode_tokens_per_s"]
        row["vs_single"] = round(value / base, 3) if value and base else None
    return rows


def _decode_rates(runs: Sequence[tuple[float, float, int]]) -> list[float]:
    """Tokens after the first, per second from the first to the last, per run."""
    rates = (decode_rate(n, t, e) for t, e, n in runs)
    return [r for r in rates if r is not None]


def _median_decode(runs: Sequence[tuple[float, float, int]]) -> float | None:
    rates = _decode_rates(runs)
    return statistics.median(rates) if rates else None


def _single_timings(runs: Sequence[dict[str, Any]]) -> list[tuple[float, float, int]]:
    return [(r["ttft_s"], r["elapsed_s"], len(r["token_ids"])) for r in runs]
