"""`p2pr generate`: text from a local pipeline of stage node processes, streamed.

    p2pr generate "PROMPT" [--nodes N] [--max-tokens K] [--seed S] [--temp T] [--model DIR]
                  [--join MULTIADDR ... [--cluster-secret S]] [--keep] [--stats] [--json]

It joins the nodes given with `--join` (of a `p2pr serve` cluster, any one node), else the pipeline kept for this model and node count
(`p2pr pipeline up`), else starts one (kept with `--keep`). A model of an untested
architecture (`--allow-untested-architecture`) has its first tokens checked against
single-process mlx-lm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from ..models import model_option, model_or_exit, tokenizer_or_exit, untested_option
from ..render import console, fail, one_line

__all__ = ["add_generate_command", "links_table"]


def add_generate_command(sub: Any) -> None:
    """Register `p2pr generate`."""
    gen = sub.add_parser(
        "generate",
        help="generate text with a local pipeline of N node processes (started or joined)",
    )
    gen.add_argument("prompt")
    gen.add_argument("--nodes", type=int, default=2, help="pipeline stages (processes)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    gen.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--prefill-step-size", type=int, default=2048)
    model_option(gen)
    gen.add_argument("--raw", action="store_true", help="no chat template around the prompt")
    gen.add_argument("--join", action="append", help="join nodes at this multiaddr instead")
    gen.add_argument(
        "--cluster-secret", default=None, help="the joined nodes' secret (or P2PR_CLUSTER_SECRET)"
    )
    gen.add_argument("--keep", action="store_true", help="leave the started pipeline running")
    gen.add_argument("--stats", action="store_true", help="print the per-link protocol counters")
    gen.add_argument("--json", action="store_true", help="print one JSON result, no streaming")
    gen.add_argument("--faults", default=None, help="fault shim of started nodes (P2PR_FAULTS)")
    gen.add_argument("--client-faults", default=None, help="fault shim of this client")
    gen.add_argument(
        "--no-split-head",
        action="store_true",
        help="the last stage computes the whole LM head (default: the first stage computes "
        "part of it meanwhile, when the embeddings are tied; a loss where a hop costs more "
        "than computing that part)",
    )
    untested_option(gen)
    gen.add_argument(
        "--chunks",
        choices=["direct", "topic"],
        default="direct",
        help="token chunks sent to this client alone, or published on the token topic",
    )
    gen.set_defaults(func=_cmd_generate)


@attrs.define
class _Pipeline:
    """The pipeline a generate uses: its addresses, how it came to be, the cluster this
    command started (stopped at the end unless kept) and the record of a kept one."""

    addrs: list[str]
    how: str
    cluster: Any = None
    record: Path | None = None


def _cmd_generate(args: argparse.Namespace) -> int:
    import anyio

    from inference_glue.architectures import architecture_for, read_config
    from inference_glue.client import ModelDoesNotFitError, PipelineError, StageFailedError
    from inference_glue.tokens import IncompleteStreamError, TextMismatchError

    from ..stage_cluster import ClusterStartError

    err = console(stderr=True)
    if args.temp > 0 and args.seed is None:
        args.seed = 0
    if args.max_tokens < 1:
        return fail("generate", f"--max-tokens must be at least 1, got {args.max_tokens}")
    model_dir = model_or_exit(args.model, "generate", args.allow_untested_architecture)
    arch = architecture_for(str(read_config(model_dir).get("model_type")), allow_untested=True)
    if not arch.tested:
        err.print(
            f"[bold red]model_type {arch.model_type!r} is not a tested architecture: the "
            f"first tokens will be checked against single-process mlx-lm[/]"
        )
    prompt_ids = _prompt_ids(args, tokenizer_or_exit(model_dir, "generate"))
    if not prompt_ids:
        return fail("generate", "the prompt has no tokens (an empty prompt with --raw?)")
    try:
        pipeline = _pipeline(args, model_dir, err)
    except (ClusterStartError, ValueError) as exc:
        return fail("generate", exc)
    try:
        result = anyio.run(_generate, args, model_dir, prompt_ids, pipeline, err)
    except (
        PipelineError,
        StageFailedError,
        IncompleteStreamError,
        TextMismatchError,
        ModelDoesNotFitError,
        ValueError,
        OSError,
    ) as exc:
        sys.stdout.write("\n")
        return fail("generate", exc, 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback (e.g. an ExceptionGroup)
        sys.stdout.write("\n")
        return fail("generate", f"{type(exc).__name__}: {one_line(exc)}", 1)
    finally:
        if pipeline.cluster is not None and not args.keep:
            pipeline.cluster.close()
    code = 0 if arch.tested else _check_untested(model_dir, prompt_ids, args, result)
    _report(result, args, err)
    return code


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    """The prompt's token ids, in the model's chat template unless `--raw`."""
    from inference_glue.local_pipeline import prompt_token_ids

    prompt: Any = args.prompt
    if not args.raw and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt_token_ids(tokenizer, prompt)


def _pipeline(args: argparse.Namespace, model_dir: Path, err: Console) -> _Pipeline:
    """The nodes of `--join`, else the kept pipeline, else a new one (kept with `--keep`)."""
    from ..kept import cluster_state_path, running_cluster, save_cluster
    from ..stage_cluster import StageCluster

    if args.join:
        return _Pipeline(list(args.join), "joined")
    state = running_cluster(model_dir, args.nodes)
    if state is not None:
        how = f"joined the running pipeline (pids {state['pids']})"
        return _Pipeline(state["addrs"], how, record=cluster_state_path(model_dir, args.nodes))
    cluster = StageCluster(model_dir, args.nodes, faults=args.faults, detach=args.keep)
    cluster.start(progress=lambda line: err.print(f"[dim]{line}[/]"))
    if not args.keep:
        return _Pipeline(cluster.addrs, "started", cluster)
    record = save_cluster(cluster)
    how = f"started and kept (p2pr pipeline down stops it; {record})"
    return _Pipeline(cluster.addrs, how, cluster, record)


async def _generate(
    args: argparse.Namespace,
    model_dir: Path,
    prompt_ids: list[int],
    pipeline: _Pipeline,
    err: Console,
) -> dict[str, Any]:
    """Stream one generation (printed as it comes unless `--json`); the JSON result."""
    from inference_glue.client import PipelineClient

    from ..kept import record_plan

    secret = args.cluster_secret or os.environ.get("P2PR_CLUSTER_SECRET")
    async with PipelineClient.connect(
        pipeline.addrs,
        model_dir,
        faults=args.client_faults,
        chunks=args.chunks,
        split_head=not args.no_split_head,
        cluster_secret=secret.encode() if secret else None,
    ) as client:
        stages = ", ".join(
            f"stage {s.index} (…{s.node_id[-6:]}) layers {s.layers.start}-{s.layers.stop - 1}"
            for s in client.stages
        )
        err.print(f"[dim]pipeline {pipeline.how}: {stages}[/]")
        options = ("temp", "top_p", "seed", "prefill_step_size")
        stream = client.stream(
            prompt_ids, args.max_tokens, **{k: getattr(args, k) for k in options}
        )
        start = time.perf_counter()
        first = None
        chunks = []
        async with aclosing(stream):
            async for chunk in stream:
                first = first or time.perf_counter()
                chunks.append(chunk)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        end = time.perf_counter()
        if pipeline.record is not None:  # after a failover: the nodes that serve, their layers
            record_plan(pipeline.record, client.stage_records())
        if not args.json:
            sys.stdout.write("\n")
        stats = await client.stats() if (args.stats or args.json) else None
        return _result(model_dir, prompt_ids, client, chunks, (start, first or end, end), stats)


def _result(
    model_dir: Path,
    prompt_ids: list[int],
    client: Any,
    chunks: list[Any],
    times: tuple[float, float, float],
    stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """The JSON result of one generation; `times`: its start, first and last token."""
    from inference_glue.tokens import decode_rate

    start, first, end = times
    rate = decode_rate(len(chunks), first, end)
    return {
        "model": model_dir.name,
        "stages": [
            {
                "stage": s.index,
                "node_id": s.node_id,
                "layers": [s.layers.start, s.layers.stop],
                "pid": s.pid,
            }
            for s in client.stages
        ],
        "prompt_tokens": len(prompt_ids),
        "token_ids": [c.token_id for c in chunks],
        "text": "".join(c.text for c in chunks),
        "finish_reason": chunks[-1].finish_reason if chunks else None,
        "ttft_ms": round((first - start) * 1000, 1),
        "decode_tokens_per_s": None if rate is None else round(rate, 2),
        "counters": stats,
        "failovers": [r.to_dict() for r in client.recoveries],
        "events": [e.line() for e in client.events],
    }


def _report(result: dict[str, Any], args: argparse.Namespace, err: Console) -> None:
    """The JSON result (`--json`), or a summary line, the failovers and the counters."""
    if args.json:
        print(json.dumps(result))
        return
    err.print(
        f"[dim]{len(result['token_ids'])} tokens ({result['finish_reason']}), "
        f"first after {result['ttft_ms']:.0f} ms, {result['decode_tokens_per_s']} tokens/s[/]"
    )
    for failover in result["failovers"]:
        err.print(
            f"[yellow]failover: {failover['reason']}; resumed after {failover['resumed_from']} "
            f"tokens on layers {failover['layers']}, first new token {failover['recover_s']} s "
            f"after the loss was noticed[/]"
        )
    if result["counters"] is not None:
        err.print(links_table(result["counters"]))


def _check_untested(
    model_dir: Path, prompt_ids: list[int], args: argparse.Namespace, result: dict[str, Any]
) -> int:
    """For a model outside the tested architectures: its first tokens against mlx-lm's own
    single-process generation. Says loudly whether they are identical; 1 if not (or if the
    check itself fails)."""
    from ..reference import ReferenceError
    from ..verify import check_first_tokens

    err = console(stderr=True)
    options = ("temp", "top_p", "seed", "prefill_step_size")
    request = {"prompt_ids": prompt_ids, **{k: getattr(args, k) for k in options}}
    try:
        checked, divergence = check_first_tokens(model_dir, request, result["token_ids"])
    except (ReferenceError, OSError, ValueError) as exc:
        result["untested_check"] = {"checked": 0, "error": one_line(exc)}
        err.print(f"[bold red]UNVERIFIED: the single-process check failed: {one_line(exc)}[/]")
        return 1
    result["untested_check"] = {"checked": checked, "first_divergence": divergence}
    if divergence is None:
        err.print(
            f"[yellow]untested architecture: the first {checked} tokens are identical to "
            f"single-process mlx-lm (later ones unchecked)[/]"
        )
        return 0
    err.print(
        f"[bold red]WRONG OUTPUT: this untested architecture differs from single-process "
        f"mlx-lm from token {divergence} on; do not use it split[/]"
    )
    return 1


_SHORT = {
    "checksum_failures": "bad sum",
    "decode_errors": "bad frame",
    "retransmits": "resent",
    "nacks_sent": "nack out",
    "nacks_received": "nack in",
    "losses": "lost",
    "unrecoverable": "gave up",
    "shim_corrupted": "shim dmg",
}


def links_table(counters: dict[str, Any], title: str = "protocol counters per link") -> Table:
    """The link rows of `PipelineClient.stats()` as a table."""
    from inference_glue.client import LINK_COUNTERS

    table = Table(title=title, caption="each row: what `node` recorded about frames from/to `peer`")
    table.add_column("node", no_wrap=True)
    table.add_column("peer", no_wrap=True)
    for name in LINK_COUNTERS:
        table.add_column(_SHORT.get(name, name), justify="right")
    table.add_column("rtt ms", justify="right")
    for row in counters["links"]:
        table.add_row(
            f"{row['node']} …{row['node_id'][-4:]}",
            f"{row['peer']} …{row['peer_id'][-4:]}",
            *(str(row[name]) for name in LINK_COUNTERS),
            "" if row["rtt_p50_ms"] is None else f"{row['rtt_p50_ms']:.2f}",
        )
    return table
