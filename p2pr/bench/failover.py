"""`p2pr bench failover`: SIGKILL of a stage mid-answer, and the time to the next token.

A pipeline of three stage node processes on 127.0.0.1 streams one seeded-sampling answer to a
`PipelineClient`; when the client has received `after` tokens, the benchmark SIGKILLs the
first or the middle stage and times the gap from the kill to the next token reaching the
client (the client's failover driver detects the loss, re-plans the layers over the two
nodes left and resumes the request). Every answer is compared, token for token and text for
text, with mlx-lm's single-process answer (`p2pr.reference`, with the nodes' BLAS set-up).

Each kill point gets a fresh cluster. The kill points run interleaved for `repeats` rounds
(`p2pr.bench.repeats`); per kill point the medians and spreads of: kill to next token, kill
to the first token of the resumed request (the next token may already have been past the
stage that died), kill to detection, re-planning, and detection to the resumed token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from math import inf
from pathlib import Path
from typing import Any

import anyio
import attrs

from inference_glue.client import PipelineClient, load_tokenizer
from inference_glue.local_pipeline import prompt_token_ids
from p2pr.bench.repeats import DEFAULT_REPEATS, run_interleaved, summarize
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster

__all__ = ["DEFAULT_AFTER", "GOAL_S", "VICTIMS", "KillCase", "bench_failover"]

STAGES = 3
VICTIMS = {"first": 0, "middle": 1}
DEFAULT_AFTER = (1, 40, 63)
GOAL_S = 1.5
PROMPT = "Once upon a time, far away"
# Seeded sampling (a random tiny model soon repeats one token under greedy decoding); the
# first seed from here whose reference answer runs to its full length without an EOS.
FIRST_SEED = 11
SEEDS_TRIED = 16
TEMP = 0.8
# Tokens after the kill point of the long answer: the kill lands mid-answer.
LONG_TAIL = 8
FIGURES = ("kill_to_next_token_s", "kill_to_resumed_s", "detect_s", "replan_s", "resume_s")


@attrs.frozen
class KillCase:
    """SIGKILL stage `victim` ('first', 'middle') after token `after` of a `tokens`-token
    answer."""

    victim: str
    after: int
    tokens: int

    @property
    def label(self) -> str:
        return f"kill the {self.victim} stage after token {self.after} of {self.tokens}"


def kill_cases(
    victims: Sequence[str], after: Sequence[int], tokens: int, long_after: int
) -> list[KillCase]:
    """Every victim at every kill point, then after `long_after` of a long answer (0: none)."""
    if any(v not in VICTIMS for v in victims):
        raise ValueError(f"victims are {', '.join(VICTIMS)}")
    if any(not 1 <= a < tokens for a in after):
        raise ValueError(f"kill points must leave a token to come: 1 <= after < {tokens}")
    cases = [KillCase(v, a, tokens) for v in victims for a in after]
    if long_after > 0:
        cases += [KillCase(v, long_after, long_after + LONG_TAIL) for v in victims]
    return cases


def bench_failover(
    model_dir: Path,
    cases: Sequence[KillCase],
    repeats: int = DEFAULT_REPEATS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every case `repeats` times, interleaved; the JSON-ready result."""
    say = progress or (lambda _: None)
    prompt_ids = prompt_token_ids(load_tokenizer(model_dir), PROMPT)
    say("the single-process reference answers")
    references = {
        length: _reference(model_dir, prompt_ids, length)
        for length in sorted({c.tokens for c in cases})
    }
    samples = run_interleaved(
        list(cases),
        repeats,
        lambda case, _: _measure(model_dir, prompt_ids, case, references[case.tokens]),
        say,
        lambda case: case.label,
    )
    rows = [_merge(runs) for runs in samples]
    slowest = max(
        (max(r["kill_to_next_token_s"] or inf, r["kill_to_resumed_s"] or inf) for r in rows),
        default=None,
    )
    return {
        "model": model_dir.name,
        "stages": STAGES,
        "repeats": repeats,
        "prompt": PROMPT,
        "temp": TEMP,
        "rows": rows,
        "all_identical": all(r["identical"] for r in rows),
        "goal": f"kill to next and to resumed token <= {GOAL_S} s (medians) wherever the "
        "kill lands",
        "goal_met": slowest is not None and slowest <= GOAL_S,
    }


def _reference(model_dir: Path, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
    """The reference answer of `tokens` tokens: the first seed that runs to full length."""
    cases = [
        {"prompt_ids": prompt_ids, "max_tokens": tokens, "temp": TEMP, "seed": seed}
        for seed in range(FIRST_SEED, FIRST_SEED + SEEDS_TRIED)
    ]
    for case, answer in zip(cases, run_reference(model_dir, cases)):
        if len(answer["token_ids"]) == tokens:
            return {**case, "token_ids": answer["token_ids"], "text": answer["text"]}
    raise ValueError(f"no seed of {SEEDS_TRIED} gives an answer of {tokens} tokens without EOS")


def _measure(
    model_dir: Path, prompt_ids: list[int], case: KillCase, reference: dict[str, Any]
) -> dict[str, Any]:
    """One kill on a fresh cluster: the timings and whether the answer is the reference's."""
    with StageCluster(model_dir, STAGES) as cluster:
        measured: dict[str, Any] = anyio.run(_stream_and_kill, cluster, case, reference)
    ids, text = measured.pop("token_ids"), measured.pop("text")
    return {
        "victim": case.victim,
        "victim_stage": VICTIMS[case.victim],
        "after_token": case.after,
        "tokens": case.tokens,
        "seed": reference["seed"],
        **measured,
        "identical": ids == reference["token_ids"] and text == reference["text"],
    }


async def _stream_and_kill(
    cluster: StageCluster, case: KillCase, reference: dict[str, Any]
) -> dict[str, Any]:
    ids: list[int] = []
    texts: list[str] = []
    killed_at = next_at = None
    async with PipelineClient.connect(cluster.addrs, cluster.model_dir) as client:
        stream = client.stream(
            reference["prompt_ids"], case.tokens, temp=TEMP, seed=reference["seed"]
        )
        async with aclosing(stream):
            async for chunk in stream:
                if killed_at is not None and next_at is None:
                    next_at = time.perf_counter()
                ids.append(chunk.token_id)
                texts.append(chunk.text)
                if len(ids) == case.after:
                    killed_at = cluster.kill(VICTIMS[case.victim])
        recovery = client.recoveries[0] if client.recoveries else None
    return {
        "token_ids": ids,
        "text": "".join(texts),
        "kill_to_next_token_s": _since(killed_at, next_at),
        # The next token may have been on its way already (past the stage that died): the
        # stall is what the resumed request's first token shows.
        "kill_to_resumed_s": _since(killed_at, recovery.first_token_at if recovery else None),
        "detect_s": _since(killed_at, recovery.detected_at if recovery else None),
        "replan_s": recovery.replan_seconds if recovery else None,
        "resume_s": recovery.recover_seconds if recovery else None,
        "recoveries": len(client.recoveries),
    }


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 4)


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    row = summarize(rounds, FIGURES, digits=3)
    row["identical"] = all(r["identical"] for r in rounds)
    row["recoveries"] = [r["recoveries"] for r in rounds]
    return row
