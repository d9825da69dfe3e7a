"""`p2pr bench …`: measurements, each printed as a table and one JSON line (`--json`: the JSON
only).

    p2pr bench codec        envelope encode/decode and checksum speed
    p2pr bench router       bare gossipsub vs the reliable router, 3 processes
    p2pr bench detect       SIGKILL of a node -> "dead" in the others' views
    p2pr bench generate     single-process mlx-lm vs 2- and 3-stage pipelines
    p2pr bench api          the HTTP API vs p2pr generate (2 stages) and mlx_lm.server
    p2pr bench loss-sweep   goodput and token latency against dropped frames (a PNG plot)
    p2pr bench failover     SIGKILL of a stage mid-answer -> the next token
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from ..bench.losssweep import DEFAULT_RATES, DEFAULT_SIZES, percent
from ..bench.repeats import DEFAULT_REPEATS, with_spread
from ..models import model_option, model_or_exit
from ..render import console, emit, fail, make_table
from .bench_tables import api_tables, failover_table, generate_table, loss_sweep_table

__all__ = ["add_bench_commands"]


def add_bench_commands(sub: Any) -> None:
    """Register `p2pr bench` and its measurements."""
    bench = sub.add_parser("bench", help="micro-benchmarks (print a table and JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    codec = bench_sub.add_parser("codec", help="envelope encode/decode and checksum speed")
    _json_option(codec)
    _repeats_option(codec)
    codec.add_argument("--messages", type=int, default=50_000)
    codec.set_defaults(func=_cmd_bench_codec)
    router = bench_sub.add_parser("router", help="bare gossipsub vs the reliable router")
    _json_option(router)
    _repeats_option(router)
    router.set_defaults(func=_cmd_bench_router)
    detect = bench_sub.add_parser("detect", help="time from SIGKILL of a node to 'dead'")
    detect.add_argument("--trials", type=int, default=3)
    _json_option(detect)
    detect.set_defaults(func=_cmd_bench_detect)
    _add_generate(bench_sub)
    _add_api(bench_sub)
    _add_loss_sweep(bench_sub)
    _add_failover(bench_sub)


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON result")


def _repeat_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"a number of rounds, at least 1: {text!r}")
    return count


def _repeats_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repeats",
        type=_repeat_count,
        default=DEFAULT_REPEATS,
        help="rounds over every configuration, interleaved; figures are medians over them, "
        f"with their spread (default {DEFAULT_REPEATS})",
    )


def _progress(err: Console) -> Any:
    return lambda line: err.print(f"running: {line}")


# -- codec, router, detect -----------------------------------------------------------------


def _cmd_bench_codec(args: argparse.Namespace) -> int:
    from ..bench.codec import bench_codec

    result = bench_codec(messages=args.messages, repeats=args.repeats)
    rows = [
        (
            "encode+checksum+decode, 1 KiB message",
            with_spread(result, "encode_decode_us_per_1kib", "{:.2f}") + " µs",
            "≤ 15 µs",
        ),
        ("  encode alone", with_spread(result, "encode_us_per_1kib", "{:.2f}") + " µs", ""),
        (
            "  decode (verify) alone",
            with_spread(result, "decode_us_per_1kib", "{:.2f}") + " µs",
            "",
        ),
        ("wire size of a 1 KiB message", f"{result['wire_bytes_per_1kib']} B", ""),
        (
            "xxh3-64 over 1 MiB",
            with_spread(result, "checksum_gb_per_s", "{:.1f}") + " GB/s",
            "≥ 5 GB/s",
        ),
    ]
    columns = ("measure", f"median of {args.repeats} (min–max)", "target")
    emit(result, args.json, make_table("p2pr bench codec", columns, rows, left=["measure"]))
    return 0


def _cmd_bench_router(args: argparse.Namespace) -> int:
    from ..bench.router import bench_router

    result = bench_router(
        progress=lambda name: console(stderr=True).print(f"running: {name}…"),
        repeats=args.repeats,
    )
    columns = ("case", "delivered", "goodput msg/s", "MB/s", "p50 ms", "p99 ms", "retransmits")
    rows = [
        (
            row["case"],
            with_spread(row, "delivery_ratio", "{:.2%}", sep="\n"),
            with_spread(row, "goodput_msg_per_s", "{:.0f}", sep="\n"),
            with_spread(row, "goodput_mb_per_s", "{:.2f}", sep="\n"),
            with_spread(row, "latency_p50_ms", sep="\n"),
            with_spread(row, "latency_p99_ms", sep="\n"),
            with_spread(row, "retransmits", sep="\n"),
        )
        for row in result["rows"]
    ]
    title = (
        "p2pr bench router (3 processes on 127.0.0.1, 1 publisher): "
        f"median (min–max) of {result['repeats']} interleaved rounds"
    )
    note = "latency of bulk rows is under full load (queueing included); the point-to-point row is paced"
    emit(result, args.json, make_table(title, columns, rows), note, width=150)
    return 0


def _cmd_bench_detect(args: argparse.Namespace) -> int:
    from ..bench.detect import bench_detect

    result = bench_detect(trials=args.trials)
    rows = [(str(i // 2 + 1), f"{s:.3f}") for i, s in enumerate(result["detect_s"])]
    table = make_table(
        "p2pr bench detect: SIGKILL -> 'dead' in the other nodes' views",
        ("trial", "seconds"),
        rows,
        caption=f"max {result['max_s']:.3f} s, mean {result['mean_s']:.3f} s",
    )
    emit(result, args.json, table)
    return 0


# -- generate ------------------------------------------------------------------------------


def _add_generate(bench_sub: Any) -> None:
    bench = bench_sub.add_parser(
        "generate", help="single-process mlx-lm vs 2- and 3-stage pipelines (tokens/s, TTFT)"
    )
    _json_option(bench)
    model_option(bench)
    bench.add_argument("--prompt", default="Once upon a time")
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--runs", type=int, default=3, help="timed runs per round")
    _repeats_option(bench)
    bench.add_argument("--compute", choices=["inline", "thread"], default="thread")
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


def _cmd_bench_generate(args: argparse.Namespace) -> int:
    from ..bench.generate import bench_generate
    from ..reference import ReferenceError
    from ..stage_cluster import ClusterStartError

    model_dir = model_or_exit(args.model, "bench generate")
    try:
        result = bench_generate(
            model_dir,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            runs=args.runs,
            repeats=args.repeats,
            compute=args.compute,
            chunks=args.chunks,
            concurrent=args.concurrent,
            split_head=not args.no_split_head,
            progress=_progress(console(stderr=True)),
        )
    except (ClusterStartError, ReferenceError, ValueError) as exc:
        return fail("bench generate", exc)
    drift = result["single_drift"]
    notes = [
        f"each configuration ran alone, in turns; the single process from the first round to "
        f"the last: {drift:+.1%} drift in its decode tok/s"
        if drift is not None
        else "each configuration ran alone",
        f"goal: {result['goal']}: {'met' if result['goal_met'] else 'NOT met'}",
    ]
    # Nine columns of medians with their spreads: wider than the default console.
    emit(result, args.json, generate_table(result), *notes, width=170)
    return 0


# -- loss-sweep ----------------------------------------------------------------------------


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


def _add_loss_sweep(bench_sub: Any) -> None:
    sweep = bench_sub.add_parser(
        "loss-sweep",
        help="goodput and token latency against the loss rate; writes a PNG plot",
    )
    _json_option(sweep)
    sweep.add_argument(
        "--rates",
        type=_rates,
        default=DEFAULT_RATES,
        help=f"fractions of frames dropped (default {','.join(map(str, DEFAULT_RATES))})",
    )
    sweep.add_argument("--png", default="loss-sweep.png", help="where the plot goes")
    model_option(sweep, default="tiny")
    sweep.add_argument("--nodes", type=int, default=2, help="pipeline stages (processes)")
    sweep.add_argument("--tokens", type=int, default=32, help="tokens per request")
    sweep.add_argument("--generations", type=int, default=3, help="timed requests per rate")
    _repeats_option(sweep)
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


def _cmd_bench_loss_sweep(args: argparse.Namespace) -> int:
    from ..bench.lossplot import PlotUnavailableError, require_matplotlib, write_plot
    from ..bench.losssweep import SweepConfig, run_sweep
    from ..stage_cluster import ClusterStartError

    try:
        require_matplotlib()  # before minutes of measuring, not after
    except PlotUnavailableError as exc:
        return fail("bench loss-sweep", exc)
    model_dir = model_or_exit(args.model, "bench loss-sweep")
    err = console(stderr=True)
    try:
        config = SweepConfig(
            rates=args.rates,
            sizes=args.sizes,
            seconds=args.seconds,
            nodes=args.nodes,
            tokens=args.tokens,
            generations=args.generations,
            repeats=args.repeats,
        )
        result = run_sweep(model_dir, config, progress=_progress(err))
    except (ClusterStartError, ValueError, RuntimeError) as exc:
        return fail("bench loss-sweep", exc)
    code = 0 if result["all_complete"] else 1
    try:
        result["png"] = str(write_plot(result, args.png).resolve())
    except OSError as exc:  # the measurements are still printed below
        fail("bench loss-sweep", f"cannot write {args.png}: {exc}")
        result["png"] = None
        code = 2
    if not args.json:
        for row in result["rows"]:
            for error in row["errors"]:
                err.print(f"[red]loss {percent(row['loss_rate'])}: {error}[/]")
    notes = [f"plot: {result['png']}"] if result["png"] else []
    emit(result, args.json, loss_sweep_table(result), *notes)
    return code


# -- failover ------------------------------------------------------------------------------


def _kill_points(text: str) -> tuple[int, ...]:
    try:
        points = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of tokens: {text!r}"
        ) from None
    if not points or min(points) < 1:
        raise argparse.ArgumentTypeError("kill points are token counts, at least 1")
    return points


def _victims(text: str) -> tuple[str, ...]:
    from ..bench.failover import VICTIMS

    victims = tuple(part.strip() for part in text.split(",") if part.strip())
    if not victims or any(v not in VICTIMS for v in victims):
        raise argparse.ArgumentTypeError(f"victims are {', '.join(VICTIMS)}: {text!r}")
    return victims


def _add_failover(bench_sub: Any) -> None:
    bench = bench_sub.add_parser(
        "failover", help="SIGKILL of a stage mid-answer: time to the next token, same output"
    )
    _json_option(bench)
    _repeats_option(bench)
    model_option(bench, default="tiny")
    bench.add_argument(
        "--victims", type=_victims, default=("middle", "first"), help="stages to kill"
    )
    bench.add_argument(
        "--after", type=_kill_points, default=(1, 40, 63), help="kill after these tokens"
    )
    bench.add_argument("--tokens", type=int, default=64, help="tokens of the answer")
    bench.add_argument(
        "--long",
        type=int,
        default=1000,
        help="also kill after this token of a long answer (0: no long answer)",
    )
    bench.set_defaults(func=_cmd_bench_failover)


def _cmd_bench_failover(args: argparse.Namespace) -> int:
    from ..bench.failover import bench_failover, kill_cases
    from ..reference import ReferenceError
    from ..stage_cluster import ClusterStartError

    try:
        cases = kill_cases(args.victims, args.after, args.tokens, args.long)
    except ValueError as exc:
        return fail("bench failover", exc)
    model_dir = model_or_exit(args.model, "bench failover")
    try:
        result = bench_failover(
            model_dir, cases, repeats=args.repeats, progress=_progress(console(stderr=True))
        )
    except (ClusterStartError, ReferenceError, ValueError) as exc:
        return fail("bench failover", exc)
    note = f"goal: {result['goal']}: {'met' if result['goal_met'] else 'NOT met'}"
    emit(result, args.json, failover_table(result), note)
    return 0 if result["all_identical"] else 1


# -- api -------------------------------------------------------------------------------------


def _add_api(bench_sub: Any) -> None:
    api = bench_sub.add_parser(
        "api", help="the HTTP API vs p2pr generate (2 stages) and mlx_lm.server; concurrency"
    )
    model_option(api)
    api.add_argument("--max-tokens", type=int, default=64)
    api.add_argument("--runs", "--repeats", type=int, default=5, help="interleaved runs per way")
    api.add_argument("--no-mlx-server", action="store_true", help="leave mlx_lm.server out")
    _json_option(api)
    api.set_defaults(func=_cmd_bench_api)


def _cmd_bench_api(args: argparse.Namespace) -> int:
    from ..bench.api import bench_api

    if args.runs < 1 or args.max_tokens < 2:
        return fail("bench api", "--runs must be >= 1 and --max-tokens >= 2")
    try:
        import openai  # noqa: F401  (the API is measured with the official client)
    except ImportError:
        return fail("bench api", "the openai package is needed: pip install openai")
    model_dir = model_or_exit(args.model, "bench api")
    err = console(stderr=True)
    result = bench_api(
        model_dir,
        max_tokens=args.max_tokens,
        runs=args.runs,
        mlx_server=not args.no_mlx_server,
        progress=_progress(err),
    )
    emit(result, args.json, *api_tables(result))
    return 0
