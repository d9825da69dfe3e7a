"""`p2pr serve`: the one command to run on every machine of a cluster (`p2pr.serve`).

    p2pr serve --model DIR [--listen /ip4/0.0.0.0/tcp/4001] [--bootstrap MULTIADDR ...]
               [--peers-file FILE] [--mdns] [--cluster-secret S | --insecure]
               [--memory-budget 8G] [--api-port 8000 [--api-host H] [--api-key KEY]]

A node of the cluster that serves the layers the cluster's plan gives it; with `--api-port`
it also serves the OpenAI-compatible API and plans the pipeline (one node per cluster).

It listens on every interface, port 4001, unless told otherwise: other machines must reach
it, and a fixed port keeps the join command it prints valid across restarts (the identity
is kept too). Off loopback it requires a cluster secret: the one given, else the one kept
in `--secret-file` (made on first use, mode 0600); only `--insecure` lets anyone on the
network in. The API listens on 127.0.0.1 unless `--api-host` says otherwise, and then only
with an `--api-key`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from typing import Any

import attrs

from discovery.identity import DEFAULT_IDENTITY, IdentityError, ephemeral_identity, load_identity
from discovery.peers import PeerAddressError
from discovery.secret import DEFAULT_SECRET, load_or_create_secret

from ..models import model_option, model_or_exit, untested_option
from ..render import console, fail, one_line
from .node import SECRET_ENV, discovery_args, discovery_settings

__all__ = ["API_KEY_ENV", "DEFAULT_LISTEN", "add_serve_command", "join_command"]

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
API_KEY_ENV = "P2PR_API_KEY"
# Set once `p2pr serve` runs with the nodes' BLAS environment (it re-executes itself so).
_BLAS_READY_ENV = "P2PR_SERVE_BLAS"


def add_serve_command(sub: Any) -> None:
    """Register `p2pr serve`."""
    serve = sub.add_parser("serve", help="serve a model as one node of a cluster (+ HTTP API)")
    model_option(serve)
    discovery_args(serve)
    serve.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"/ip4/ADDR/tcp/PORT (default {DEFAULT_LISTEN})"
    )
    serve.add_argument(
        "--insecure", action="store_true", help="off loopback without a cluster secret: anyone"
    )
    serve.add_argument(
        "--secret-file", default=str(DEFAULT_SECRET), help="where the cluster secret is kept"
    )
    serve.add_argument(
        "--identity", default=str(DEFAULT_IDENTITY), help="ed25519 key file ('none': a new one)"
    )
    serve.add_argument(
        "--memory-budget", default=None, help="bytes of weights to hold, e.g. 8G (default: free)"
    )
    serve.add_argument("--model-name", default=None, help="the model's name in the API")
    serve.add_argument("--api-port", type=int, default=None, help="serve the API (0: any port)")
    serve.add_argument("--api-host", default="127.0.0.1", help="the API's address")
    serve.add_argument("--api-key", default=None, help=f"API bearer key (or {API_KEY_ENV})")
    serve.add_argument(
        "--compute",
        choices=["inline", "thread"],
        default="thread",
        help="where the MLX work runs (default: a thread of its own, measured faster and "
        "keeping the node responsive; inline: on the event loop)",
    )
    untested_option(serve)
    serve.set_defaults(func=_cmd_serve)


def _cluster_secret(args: argparse.Namespace, host: str) -> tuple[str | None, bool]:
    """The cluster secret and whether it was made now (see the module docstring)."""
    from ..api.auth import is_loopback

    given = args.cluster_secret or os.environ.get(SECRET_ENV)
    if given and args.insecure:
        raise ValueError("--insecure and a cluster secret contradict each other: give one")
    if given or args.insecure or is_loopback(host):
        return given, False
    return load_or_create_secret(args.secret_file)


def join_command(model: str, addr: str, secret: str | None, listen: str) -> list[str]:
    """The command another machine runs to join the node listening at `addr` (which
    listens as `listen` says)."""
    command = ["p2pr", "serve", "--model", model, "--bootstrap", addr]
    if listen != DEFAULT_LISTEN:
        # Its own addresses, on the port this node uses.
        command += ["--listen", f"/ip4/0.0.0.0/tcp/{listen.rsplit('/tcp/', 1)[-1]}"]
    command += ["--cluster-secret", secret] if secret else ["--insecure"]
    return command


def _with_node_environment() -> None:
    """Re-execute this command with the nodes' BLAS set-up (`blas.node_environment`:
    OpenBLAS preloaded, one fixed thread count) unless it has it: the set-up must be in the
    environment when the process starts, and every node needs the same for bit-exact
    results."""
    if os.environ.get(_BLAS_READY_ENV) == "1":
        return
    from inference_glue.blas import node_environment

    env = node_environment()
    env[_BLAS_READY_ENV] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "p2pr", *sys.argv[1:]], env)


def _cmd_serve(args: argparse.Namespace) -> int:
    if sys.argv[1:2] == ["serve"]:  # run from the command line (not main() from Python)
        _with_node_environment()
    from inference_glue.footprint import available_memory, parse_bytes

    from ..api import ApiSettings
    from ..api.auth import check_bind
    from ..serve import ServeSettings

    try:
        node = discovery_settings(args, "stage")
        secret, made = _cluster_secret(args, node.listen_host)
        api = None
        if args.api_port is not None:
            api = ApiSettings(host=args.api_host, api_key=args.api_key or os.getenv(API_KEY_ENV))
            check_bind(api.host, api.api_key)
        budget = parse_bytes(args.memory_budget) if args.memory_budget else available_memory()
        identity = ephemeral_identity() if args.identity == "none" else load_identity(args.identity)
    except (IdentityError, PeerAddressError, ValueError, OSError) as exc:
        return fail("serve", exc)
    model_dir = model_or_exit(args.model, "serve", args.allow_untested_architecture)
    settings = ServeSettings(
        model_dir=model_dir,
        node=attrs.evolve(node, cluster_secret=secret.encode() if secret else None),
        memory_budget=budget,
        model_name=args.model_name or "",
        compute=args.compute,
        api=api,
        api_port=args.api_port or 0,
    )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if made:
        console(stderr=True).print(f"made a new cluster secret, kept in {args.secret_file}")
    code = _run(args, settings, identity, secret)
    identity.release()
    if args.compute == "thread":
        # MLX aborts at interpreter exit once a second thread has used it (p2pr.stage_node).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace, settings: Any, identity: Any, secret: str | None) -> int:
    import anyio

    from ..api.auth import is_loopback
    from ..launch import print_event
    from ..serve import ServeNode

    err = console(stderr=True)

    async def main() -> None:
        node = ServeNode(settings, identity)
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            addrs = ", ".join(node.listen_addrs)
            err.print(f"node {node.node_id} listening on {addrs}", soft_wrap=True)
            if is_loopback(settings.node.listen_host):
                err.print("listening on loopback: other machines cannot join (see --listen)")
            else:
                command = shlex.join(
                    join_command(args.model, node.listen_addrs[0], secret, args.listen)
                )
                print_event("join", command=command)
                err.print(f"to add another machine, run there:\n  {command}", soft_wrap=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    err.print(f"{signal.Signals(signum).name}: shutting down")
                    tg.cancel_scope.cancel()
                    break

    try:
        anyio.run(main, backend="trio")
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # reported to the launcher, then as one line for a person
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
        message = "; ".join(one_line(e) for e in errors)
        logging.getLogger("p2pr.serve").debug("serve failed", exc_info=True)
        print_event("error", message=message)
        return fail("serve", message, code=1)
    return 0
