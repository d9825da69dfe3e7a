"""A pipeline stage node process: a Router and one `StageNode` serving a range of layers.

    python -m p2pr.stage_node --model DIR --layers 0:15 --stage 0 --stages 2 \\
        [--bootstrap MULTIADDR ...] [--faults drop=0.1,corrupt=0.05] [--compute inline|thread]
        [--memory-budget 2G] [--corrupt-activations 0.5]

It starts a `Router`, prints `{"event": "listening", "node_id", "addrs", ...}` (`p2pr.launch`'s
event lines), loads its stage with `load_stage` (only its own weights), prints
`{"event": "ready", ...}` and serves requests (`inference_glue.node.StageNode`) until its
standard input closes (or, with `--detach`, until SIGTERM/SIGINT). A node that cannot start
prints `{"event": "error", "message": ...}` and exits with status 1. It publishes its health
view on `p2pr/health`, labelled `stage N`, unless `P2PR_SHARE_HEALTH=0`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs

from discovery.share import share_health
from inference_glue.footprint import (
    ModelFootprint,
    available_memory,
    format_bytes,
    model_fingerprint,
    parse_bytes,
)
from inference_glue.messages import LATENCY_STREAMS, REDUNDANT_MAX_BYTES
from inference_glue.node import StageNode
from inference_glue.stage import PipelineStage, load_stage
from inference_glue.worker import COMPUTE_MODES, MlxWorker
from p2p_reliable import RetryPolicy
from router import EngineConfig, FaultConfig, Router, RouterConfig
from router.faults import FAULTS_ENV

from .launch import print_event

__all__ = ["HEAD_SPLIT_ENV", "REDUNDANT_ENV", "build_parser", "main", "parse_layers", "run_node"]

log = logging.getLogger("p2pr.inference.node")

# "fixed" in a node's environment: as --head-split fixed (tests that need every token split).
HEAD_SPLIT_ENV = "P2PR_HEAD_SPLIT"
REDUNDANT_ENV = "P2PR_REDUNDANT_COPIES"


def parse_layers(text: str) -> range:
    """'0:15' -> range(0, 15)."""
    start, sep, stop = text.partition(":")
    if not sep:
        raise ValueError(f"layers must look like START:STOP, got {text!r}")
    return range(int(start), int(stop))


async def _until(wait: Callable[[], Awaitable[None]], tg: anyio.abc.TaskGroup) -> None:
    await wait()
    tg.cancel_scope.cancel()


async def _stdin_closed() -> None:
    await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def _signalled() -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def run_node(args: argparse.Namespace) -> int:
    """The node process: router, stage, serve; returns the exit status."""
    layers = parse_layers(args.layers)
    bootstrap = list(args.bootstrap)
    if args.bootstrap_stdin:
        # The launcher starts every process at once (imports take seconds) and hands each
        # its bootstrap addresses when the earlier nodes are listening.
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            raise RuntimeError("standard input closed before the bootstrap addresses came")
        bootstrap += json.loads(line)["bootstrap"]
    faults_text = args.faults if args.faults is not None else os.environ.get(FAULTS_ENV, "")
    faults = FaultConfig.parse(faults_text) if faults_text else None
    redundant = args.redundant_copies or os.environ.get(REDUNDANT_ENV, "") == "1"
    protocol = EngineConfig().protocol
    if args.retry_budget is not None:
        protocol = attrs.evolve(protocol, retry=RetryPolicy(budget=args.retry_budget))
    config = RouterConfig(
        engine=EngineConfig(
            protocol=protocol,
            faults=faults,
            redundant_streams=LATENCY_STREAMS if redundant else frozenset(),
            redundant_max_bytes=REDUNDANT_MAX_BYTES,
        )
    )
    router = Router.create(bootstrap_peers=bootstrap, listen_port=args.port, config=config)
    worker = MlxWorker(args.compute)
    try:
        await _serve_node(args, router, worker, layers)
    finally:
        worker.close()
    return 0


async def _serve_node(
    args: argparse.Namespace, router: Router, worker: MlxWorker, layers: range
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        with anyio.fail_after(60):
            await router.wait_ready()
        # Publish this stage's health view on p2pr/health, so that `p2pr health` lists it.
        tg.start_soon(share_health, router, "stage", f"stage {args.stage}")
        common = {"node_id": router.node_id, "stage": args.stage, "pid": os.getpid()}
        print_event("listening", **common, addrs=router.listen_addrs)
        start = time.perf_counter()
        node = await _load_node(args, router, worker, layers)
        tg.start_soon(node.serve)
        print_event(
            "ready",
            **common,
            addrs=router.listen_addrs,
            layers=[layers.start, layers.stop],
            load_seconds=round(time.perf_counter() - start, 3),
            fingerprint=node.fingerprint,
        )
        tg.start_soon(_until, _signalled, tg)
        if not args.detach:
            tg.start_soon(_until, _stdin_closed, tg)


async def _load_node(
    args: argparse.Namespace, router: Router, worker: MlxWorker, layers: range
) -> StageNode:
    """This node's layers, loaded within its memory budget, as a `StageNode`."""
    budget = parse_bytes(args.memory_budget) if args.memory_budget else available_memory()
    need = ModelFootprint.from_dir(args.model).stage_bytes(layers)
    if need > budget:
        raise MemoryError(
            f"layers {layers.start}-{layers.stop - 1} need {format_bytes(need)} of weights, "
            f"more than this node's memory budget of {format_bytes(budget)}"
        )
    loaded: tuple[PipelineStage, Any] = await worker.run(load_stage, args.model, layers)
    stage, tokenizer = loaded
    fingerprint = await anyio.to_thread.run_sync(model_fingerprint, args.model)
    config = json.loads((Path(args.model) / "config.json").read_text())
    head_split = args.head_split or os.environ.get(HEAD_SPLIT_ENV, "adaptive")
    return StageNode(
        router,
        stage,
        tokenizer,
        stage_index=args.stage,
        num_stages=args.stages,
        model=args.model_name or Path(args.model).name,
        fingerprint=fingerprint,
        worker=worker,
        vocab_size=int(config["vocab_size"]),
        model_dir=args.model,
        memory_budget=budget,
        corrupt_activations=args.corrupt_activations,
        fault_seed=args.fault_seed,
        allow_fault_control=args.allow_fault_control,
        adaptive_head_split=head_split != "fixed",
    )


def build_parser() -> argparse.ArgumentParser:
    """The node's command line."""
    parser = argparse.ArgumentParser(prog="python -m p2pr.stage_node", description=__doc__)
    parser.add_argument("--model", required=True, help="mlx-lm model directory")
    parser.add_argument("--model-name", default=None, help="name shown to clients")
    parser.add_argument("--layers", required=True, help="START:STOP, e.g. 0:15")
    parser.add_argument("--stage", type=int, required=True, help="this stage's index")
    parser.add_argument("--stages", type=int, required=True, help="number of stages")
    parser.add_argument("--bootstrap", action="append", default=[], help="peer multiaddr")
    parser.add_argument(
        "--bootstrap-stdin",
        action="store_true",
        help="read a JSON line {'bootstrap': [...]} from stdin before starting",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any)")
    parser.add_argument("--faults", default=None, help=f"fault shim settings (or ${FAULTS_ENV})")
    parser.add_argument("--compute", choices=COMPUTE_MODES, default="thread")
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="bytes of weights this node may hold, e.g. 512M (default: available memory)",
    )
    parser.add_argument(
        "--corrupt-activations",
        type=float,
        default=0.0,
        help="fault injection: fraction of outgoing hidden states to damage",
    )
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of that injection")
    parser.add_argument(
        "--allow-fault-control",
        action="store_true",
        help="obey SetFaults messages (chaos runs only: any peer could then inject faults)",
    )
    parser.add_argument(
        "--head-split",
        choices=["adaptive", "fixed"],
        default=None,
        help="as the last stage of a split LM head: move the cut with measured times "
        f"(adaptive, the default), or keep the client's cut (fixed, for tests; or "
        f"${HEAD_SPLIT_ENV})",
    )
    parser.add_argument(
        "--redundant-copies",
        action="store_true",
        help="send small per-token messages twice (hidden states, token feedback and chunks; "
        f"or ${REDUNDANT_ENV}=1). Off by default: on this project's loaded 2-core machines "
        "it has not yet shown a gain that outweighs the extra copies at 0%% loss",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=None,
        help="seconds after which a message a live peer has not acknowledged is given up "
        "(and the requests it belongs to fail and resume; default: the protocol's)",
    )
    parser.add_argument(
        "--detach", action="store_true", help="run until SIGTERM, not until stdin closes"
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m p2pr.stage_node`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s stage {args.stage} %(name)s %(levelname)s %(message)s",
    )
    try:
        code = anyio.run(run_node, args, backend="trio")
    except KeyboardInterrupt:
        code = 0
    except BaseException as exc:  # reported to the launcher, which names this node
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
        message = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        log.exception("node failed")
        print_event("error", stage=args.stage, message=message)
        code = 1
    if args.compute == "thread":
        # MLX 0.32 aborts at interpreter exit ("terminate called without an active
        # exception") once a second thread has used it; the work is done, so leave at once.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
