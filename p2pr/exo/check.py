"""Check the adapter against a real exo checkout: `python -m p2pr.exo.check --exo-src DIR`.

Run it with the Python 3.13 interpreter that has exo's dependencies and this project
installed. It never modifies DIR: it copies the checkout (bare `exo_rs` stand-in in one
copy, the adapter in another) into a work folder, and then

1. `--suite`: runs exo's own test suite in each copy and compares (check_suite): the adapter
   run must pass at least as many tests as the bare run, and the routing, election, master,
   API and download tests must all pass with the adapter;
2. `--selftest`: two adapter Routers with exo's topics and types (p2pr.exo.selftest);
3. `--cluster`: `--starts N` consecutive fresh starts of a live 3-node exo cluster on
   127.0.0.1 (check_cluster, check_start): each must agree on one master with all three
   nodes in every API state; a `p2pr health` observer must see them and disturb no election;
   then SIGKILL of the master, SIGSTOP/SIGCONT of the master, or a follower restarted with
   its HOME, in turn; discovery by bootstrap addresses with and without `/p2p/` and by mDNS,
   in turn; CPU burners during a `--burn` fraction of the starts.

exo adds a node to its state only from that node's worker (`NodeGatheredInfo`), so the
cluster runs exo's worker by default (no model is placed, so it only gathers system info);
`--no-worker` runs without it and then the state checks are left out.

Every wait is bounded; every process started is stopped (its process group) at the end, and
dies with this process in any case. Exit status: 0 when every check passed, 1 when one
failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .cluster import plan_starts, run_cluster, starts_table, summary_table
from .common import Deadline
from .observer import p2pr_command
from .start import MODES, SCENARIOS, ClusterSetup
from .suite import (
    adapter_copy,
    bare_copy,
    run_selftest,
    run_suite,
    selftest_table,
    suite_table,
    suite_verdict,
)


def _names(text: str, allowed: Sequence[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m p2pr.exo.check",
        description="exo's tests bare vs with the adapter, and live 3-node exo clusters "
        "over p2p-reliable. Run with exo's Python 3.13 environment.",
    )
    add = parser.add_argument
    add("--exo-src", default=os.environ.get("EXO_SRC"), help="exo checkout (or EXO_SRC)")
    add("--json", action="store_true", help="print one JSON document")
    add("--suite", action="store_true", help="only exo's test suites")
    add("--cluster", action="store_true", help="only the live clusters")
    add("--selftest", action="store_true", help="only two adapter Routers with exo's types")
    add("--starts", type=int, default=20, help="consecutive fresh cluster starts (20)")
    add("--burn", type=float, default=0.5, help="fraction of starts with CPU burners (0.5)")
    add(
        "--scenarios",
        type=lambda t: _names(t, SCENARIOS),
        default=list(SCENARIOS),
        help=f"fault scenarios to cycle ({','.join(SCENARIOS)})",
    )
    add(
        "--modes",
        type=lambda t: _names(t, MODES),
        default=list(MODES),
        help=f"discovery modes to cycle ({','.join(MODES)}; mdns needs root)",
    )
    add("--max-seconds", type=float, default=None, help="overall limit for the cluster starts")
    add("--no-worker", action="store_true", help="run exo with --no-worker")
    add("--python", default=sys.executable, help="exo's Python 3.13")
    add("--p2pr", default=None, help="the p2pr command (default: this repository's .venv)")
    add("--work", default=None, help="work folder (default: a new temp folder)")
    add("--keep", action="store_true", help="keep the work folder (logs of every node)")
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The finally blocks stop every exo node and burner; SIGKILL would leave that to
    # PR_SET_PDEATHSIG alone.
    raise SystemExit(128 + signum)


def _suite(args: argparse.Namespace, exo_src: Path, work: Path, out: dict[str, Any]) -> None:
    log = _logger(args)
    log("running exo's tests with the bare exo_rs stand-in …")
    bare = run_suite("bare", bare_copy(exo_src, work), work, args.python)
    log(f"  {bare.counts} in {bare.seconds:.0f} s")
    log("running exo's tests with the adapter …")
    adapter = run_suite("adapter", adapter_copy(exo_src, work), work, args.python)
    log(f"  {adapter.counts} in {adapter.seconds:.0f} s")
    out["suite"] = {"bare": bare.to_json(), "adapter": adapter.to_json()}
    out["problems"] += suite_verdict(bare, adapter)
    if not args.json:
        print(f"\n{suite_table(bare, adapter)}")
        if adapter.collection_errors:
            print("\nfiles that fail to load (adapter run):")
            for path, message in sorted(adapter.collection_errors.items()):
                print(f"  {path}: {message}")
        print()


def _selftest(args: argparse.Namespace, copy: Path, work: Path, out: dict[str, Any]) -> None:
    _logger(args)("two adapter Routers with exo's topics and types …")
    selftest = run_selftest(copy, work, args.python)
    out["selftest"] = selftest
    if not selftest.get("ok"):
        out["problems"].append(
            f"selftest failed: {selftest.get('failed')} {selftest.get('error') or ''}"
        )
    if not args.json:
        print(f"\n{selftest_table(selftest)}\n")


def _cluster(args: argparse.Namespace, copy: Path, work: Path, out: dict[str, Any]) -> None:
    log = _logger(args)
    setup = ClusterSetup(
        copy=copy,
        work=work / "cluster",
        python=args.python,
        p2pr=args.p2pr.split() if args.p2pr else p2pr_command(args.python),
        worker=not args.no_worker,
        deadline=Deadline(args.max_seconds),
        log=log,
    )
    plans = plan_starts(args.starts, args.burn, args.scenarios, args.modes)
    log(f"{len(plans)} fresh starts of a live 3-node exo cluster over p2p-reliable …")
    cluster = run_cluster(setup, plans)
    out["cluster"] = cluster
    out["problems"] += cluster["problems"]
    if not args.json:
        print(f"\n{starts_table(cluster['starts'])}\n\n{summary_table(cluster['summary'])}")


def _logger(args: argparse.Namespace) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    return log


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.exo_src:
        print("p2pr.exo.check: give --exo-src DIR (or set EXO_SRC)", file=sys.stderr)
        return 2
    if args.starts < 1 or not 0 <= args.burn <= 1:
        print("p2pr.exo.check: --starts >= 1 and 0 <= --burn <= 1", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    exo_src = Path(args.exo_src).expanduser().resolve()
    everything = not (args.suite or args.cluster or args.selftest)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="exo-swap-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"exo_src": str(exo_src), "work": str(work), "problems": []}
    try:
        if args.suite or everything:
            _suite(args, exo_src, work, out)
        if args.selftest or args.cluster or everything:
            copy = adapter_copy(exo_src, work) if "suite" not in out else work / "exo-adapter"
            if args.selftest or everything:
                _selftest(args, copy, work, out)
            if args.cluster or everything:
                _cluster(args, copy, work, out)
    except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        out["problems"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out["ok"] = not out["problems"]
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print("\n" + ("OK" if out["ok"] else "FAILED: " + "; ".join(out["problems"])))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
