"""Two exo Routers (the adapter's) in one process, on 127.0.0.1, with exo's own topics and
types: what exo's test suite never does (it checks compatibility, not a real Router).

Run it in an exo checkout with the adapter applied (`check` does):
`PYTHONPATH=DIR/src python -m p2pr.exo.selftest [--json]`. It checks that
- `sender`/`receiver` hand out exo's own channel classes (exo.utils.channels);
- each node gets exo's `ConnectionMessage` (node_id = the other's `12D3KooW…` id) on
  exo's `connection_messages` topic when they connect, and connected=False when one stops;
- an `ElectionMessage` sent on one node reaches the other node and the sender's own
  receivers (exo's fan-out), equal to what was sent;
- bytes that are not a valid exo model are counted against their sender and dropped, and
  the node keeps routing;
- `get_node_id_keypair(path)` keeps the node id across calls and processes.
Every wait is bounded (60 s in all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio


class _Exo:
    """The exo names the scenario uses (imported from the checkout under test)."""

    def __init__(self) -> None:
        import exo.routing.topics as topics  # type: ignore[import-not-found]
        from exo.routing.connection_message import (  # type: ignore[import-not-found]
            ConnectionMessage,
        )
        from exo.routing.router import Keypair, Router  # type: ignore[import-not-found]
        from exo.shared.election import ElectionMessage  # type: ignore[import-not-found]
        from exo.shared.types.common import NodeId, SessionId  # type: ignore[import-not-found]
        from exo.utils.channels import Receiver, Sender  # type: ignore[import-not-found]

        self.topics, self.ConnectionMessage = topics, ConnectionMessage
        self.Keypair, self.Router, self.ElectionMessage = Keypair, Router, ElectionMessage
        self.NodeId, self.SessionId, self.Receiver, self.Sender = (
            NodeId,
            SessionId,
            Receiver,
            Sender,
        )
        self.six = [
            topics.GLOBAL_EVENTS,
            topics.LOCAL_EVENTS,
            topics.COMMANDS,
            topics.ELECTION_MESSAGES,
            topics.CONNECTION_MESSAGES,
            topics.DOWNLOAD_COMMANDS,
        ]

    async def node(self, bootstrap: Sequence[str] = ()) -> Any:
        router = self.Router.create(self.Keypair.generate(), bootstrap_peers=bootstrap)
        for topic in self.six:
            await router.register_topic(topic)
        return router


async def _scenario(results: dict[str, Any]) -> None:
    exo = _Exo()
    topics = exo.topics
    a = await exo.node()
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await a.wait_ready()
        b = await exo.node(a.listen_addrs)
        a_conn, b_conn = (
            a.receiver(topics.CONNECTION_MESSAGES),
            b.receiver(topics.CONNECTION_MESSAGES),
        )
        elections = (a.receiver(topics.ELECTION_MESSAGES), b.receiver(topics.ELECTION_MESSAGES))
        a_send = a.sender(topics.ELECTION_MESSAGES)
        results["exo_channel_types"] = isinstance(elections[0], exo.Receiver) and isinstance(
            a_send, exo.Sender
        )
        b_scope = anyio.CancelScope()

        async def run_b() -> None:
            with b_scope:
                await b.run()

        tg.start_soon(run_b)
        await b.wait_ready()
        first_a, first_b = await a_conn.receive(), await b_conn.receive()
        results["connection_messages"] = (
            isinstance(first_a, exo.ConnectionMessage)
            and first_a.node_id == b.node_id
            and first_a.connected
            and isinstance(first_b, exo.ConnectionMessage)
            and first_b.node_id == a.node_id
        )
        message = await _election(exo, results, a, a_send, elections)
        await _bad_payload(exo, results, (a, b), a_send, elections[1], message)
        b_scope.cancel()
        while True:
            update = await a_conn.receive()
            if update.node_id == b.node_id and not update.connected:
                results["disconnect_message"] = True
                break
        tg.cancel_scope.cancel()


async def _election(
    exo: _Exo, results: dict[str, Any], a: Any, a_send: Any, elections: tuple[Any, Any]
) -> Any:
    """An exo ElectionMessage from a reaches b, and a's own receiver."""
    await a.wait_for_subscribers(exo.topics.ELECTION_MESSAGES.topic, 1)
    message = exo.ElectionMessage(
        clock=7,
        seniority=1,
        proposed_session=exo.SessionId(master_node_id=exo.NodeId(a.node_id), election_clock=7),
        commands_seen=3,
    )
    sent_at = time.monotonic()
    await a_send.send(message)
    remote = await elections[1].receive()
    results["election_message_ms"] = round((time.monotonic() - sent_at) * 1000, 1)
    local = await elections[0].receive()
    results["election_message_remote"] = remote == message
    results["election_message_local"] = local == message
    return message


async def _bad_payload(
    exo: _Exo,
    results: dict[str, Any],
    routers: tuple[Any, Any],
    a_send: Any,
    b_elect: Any,
    message: Any,
) -> None:
    """A payload that is no exo command is counted by b, and routing goes on."""
    a, b = routers
    await a.wait_for_subscribers(exo.topics.COMMANDS.topic, 1)
    await a.publish_encoded(exo.topics.COMMANDS.topic, b'{"not": "a command"}')
    with anyio.fail_after(20):
        while not b.bad_payloads.get(a.node_id):
            await anyio.sleep(0.05)  # the count lives in b's router, which signals nothing
    results["bad_payload_counted"] = b.bad_payloads.get(a.node_id, 0)
    await a_send.send(message)
    results["routing_after_bad_payload"] = (await b_elect.receive()) == message


def _persistence(results: dict[str, Any]) -> None:
    from exo.routing.router import get_node_id_keypair

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "node_id.keypair"
        first = get_node_id_keypair(path).to_node_id()
        again = get_node_id_keypair(path).to_node_id()
        code = (
            "import sys; from exo.routing.router import get_node_id_keypair as g; "
            "print(g(sys.argv[1]).to_node_id())"
        )
        get_node_id_keypair(path).identity.release()  # let the next process take the file
        other = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout.strip()
    results["node_id_form"] = first.startswith("12D3KooW")
    results["node_id_persists"] = first == again == other


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pr.exo.selftest")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("EXO_P2PR_MDNS", "0")
    os.environ.setdefault("EXO_P2PR_LISTEN_HOST", "127.0.0.1")
    results: dict[str, Any] = {}
    error = None
    try:
        anyio.run(_run_scenario, results)
    except Exception as exc:  # reported, not raised: the caller wants every result
        error = f"{type(exc).__name__}: {exc}"
    try:
        _persistence(results)
    except Exception as exc:
        error = error or f"{type(exc).__name__}: {exc}"
    checks = [k for k, v in results.items() if isinstance(v, bool)]
    failed = [k for k in checks if not results[k]]
    expected = {
        "exo_channel_types",
        "connection_messages",
        "election_message_remote",
        "election_message_local",
        "routing_after_bad_payload",
        "disconnect_message",
        "node_id_form",
        "node_id_persists",
    }
    failed += sorted(expected - set(checks))
    results["ok"] = not failed and error is None
    results["failed"] = failed
    results["error"] = error
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:28} {value}")
    return 0 if results["ok"] else 1


async def _run_scenario(results: dict[str, Any]) -> None:
    with anyio.fail_after(60):
        await _scenario(results)


if __name__ == "__main__":
    raise SystemExit(main())
