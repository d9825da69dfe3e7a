"""Chat with a model split over three stage processes, with the links' health underneath.

    .venv/bin/python examples/three_node_chat.py [--model PATH] [--max-tokens N]
    .venv/bin/python examples/three_node_chat.py --prompt "Hi!" --prompt "Tell me more."

Joins the kept 3-node pipeline of the model if `p2pr pipeline up --nodes 3` left one
running, else starts three `python -m p2pr.stage_node` processes (stopped at the end).
Each line you type is added to the conversation, which goes through the model's chat
template (as `p2pr generate` does); the answer is printed token by token as it arrives.
Under it, a health line shows this client's view of every stage: state, round-trip time
(median of the reliability protocol's heartbeats) and loss, refreshed while the answer
streams. Commands: /health (print the health line now), /reset (forget the conversation),
/quit (or Ctrl-D).

`--prompt TEXT` (repeatable) runs those turns and exits, for scripts and tests; `--json`
then prints one JSON object per turn instead of the text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Awaitable, Callable
from contextlib import ExitStack, aclosing
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from inference_glue.client import PipelineClient, PipelineError, StageFailedError
from inference_glue.tokens import IncompleteStreamError
from p2pr.kept import running_cluster
from p2pr.models import resolve_model
from p2pr.stage_cluster import StageCluster

NODES = 3
HEALTH_REFRESH_S = 0.5


async def stage_health(client: PipelineClient) -> list[dict[str, Any]]:
    """This client's view of each stage: state, RTT median and loss ratio."""
    rows = {row["peer"]: row for row in await client.router.health()}
    out = []
    for stage in client.stages:
        row = rows.get(stage.node_id, {})
        rtt = row.get("rtt_p50")
        out.append(
            {
                "stage": stage.index,
                "peer": stage.node_id,
                "state": str(row.get("state", "unknown")).lower(),
                "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                "loss": row.get("loss_ratio", 0.0),
                "retransmits": row.get("retransmits", 0),
            }
        )
    return out


def health_line(rows: list[dict[str, Any]]) -> str:
    """'health: stage 0 …abc123 alive 0.61 ms 0.0% loss | stage 1 …'."""
    parts = []
    for r in rows:
        rtt = "? ms" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f} ms"
        parts.append(
            f"stage {r['stage']} …{r['peer'][-6:]} {r['state']} {rtt} {100 * r['loss']:.1f}% loss"
        )
    return "health: " + " | ".join(parts)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation in the model's chat template; without one, the last line alone."""
    if not getattr(tokenizer, "chat_template", None):
        return messages[-1]["content"]
    text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text


class Chat:
    """One conversation over a joined pipeline."""

    def __init__(self, client: PipelineClient, max_tokens: int, *, as_json: bool) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.as_json = as_json
        self.messages: list[dict[str, str]] = []
        self.console = Console(highlight=False)
        # Live redrawing needs a terminal; a pipe gets the tokens as plain text.
        self.live = self.console.is_terminal and not as_json

    async def turn(self, line: str) -> dict[str, Any]:
        """Send one user line; stream the answer; return what happened."""
        self.messages.append({"role": "user", "content": line})
        prompt_ids = self.client.encode_prompt(chat_prompt(self.client.tokenizer, self.messages))
        if self.live:
            chunks, health = await self._stream_live(prompt_ids)
        else:
            chunks, health = await self._stream_plain(prompt_ids)
        text = "".join(c.text for c in chunks)
        self.messages.append({"role": "assistant", "content": text})
        return {
            "prompt": line,
            "prompt_ids": prompt_ids,
            "token_ids": [c.token_id for c in chunks],
            "text": text,
            "finish_reason": chunks[-1].finish_reason if chunks else None,
            "health": health,
            "health_line": health_line(health),
        }

    async def _stream_plain(self, prompt_ids: list[int]) -> tuple[list[Any], list[dict[str, Any]]]:
        chunks = []
        if not self.as_json:
            sys.stdout.write("bot> ")
        stream = self.client.stream(prompt_ids, self.max_tokens)
        async with aclosing(stream):
            async for chunk in stream:
                chunks.append(chunk)
                if not self.as_json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        health = await stage_health(self.client)
        if not self.as_json:
            sys.stdout.write(f"\n     {health_line(health)}\n")
            sys.stdout.flush()
        return chunks, health

    async def _stream_live(self, prompt_ids: list[int]) -> tuple[list[Any], list[dict[str, Any]]]:
        chunks: list[Any] = []
        health = await stage_health(self.client)
        answer = Text("bot> ", style="bold")

        def view() -> Group:
            return Group(answer, Text(health_line(health), style="dim"))

        with Live(view(), console=self.console, auto_refresh=False) as live:

            async def refresh_health() -> None:
                nonlocal health
                while True:
                    await anyio.sleep(HEALTH_REFRESH_S)
                    health = await stage_health(self.client)
                    live.update(view(), refresh=True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(refresh_health)
                stream = self.client.stream(prompt_ids, self.max_tokens)
                async with aclosing(stream):
                    async for chunk in stream:
                        chunks.append(chunk)
                        answer.append(chunk.text)
                        live.update(view(), refresh=True)  # each token as it arrives
                tg.cancel_scope.cancel()
            health = await stage_health(self.client)
            live.update(view(), refresh=True)
        return chunks, health


async def run_chat(
    addrs: list[str],
    model_dir: Path,
    prompts: list[str],
    max_tokens: int,
    as_json: bool,
    read_line: Callable[[], Awaitable[str | None]],
) -> None:
    """Join the pipeline at `addrs`; run the scripted `prompts`, or read lines until EOF."""
    async with PipelineClient.connect(addrs, model_dir) as client:
        chat = Chat(client, max_tokens, as_json=as_json)
        stages = ", ".join(
            f"stage {s.index} layers {s.layers.start}-{s.layers.stop - 1}" for s in client.stages
        )
        print(f"connected to {len(client.stages)} stages: {stages}", file=sys.stderr)
        if prompts:
            for line in prompts:
                if not as_json:
                    print(f"you> {line}")
                result = await chat.turn(line)
                if as_json:
                    print(json.dumps(result), flush=True)
            return
        print(health_line(await stage_health(client)), file=sys.stderr)
        while (typed := await read_line()) is not None:
            text = typed.strip()
            if text in ("/quit", "/exit"):
                break
            if text == "/health":
                print(health_line(await stage_health(client)))
            elif text == "/reset":
                chat.messages.clear()
                print("(conversation forgotten)")
            elif text:
                await chat.turn(text)


async def read_stdin_line() -> str | None:
    """One line typed by the user (None at end of input), while the event loop runs on.

    Read on a daemon thread of its own: anyio's worker threads are joined at exit, so a
    Ctrl-C at the prompt would wait for one more line.
    """
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    lines: list[str | None] = []

    def read() -> None:
        try:
            lines.append(input("you> "))
        except EOFError:
            lines.append(None)
        with contextlib.suppress(RuntimeError):  # the loop is gone (Ctrl-C): nobody waits
            anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=read, name="chat-input", daemon=True).start()
    await done.wait()
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="mlx-lm directory, builtin or tiny")
    parser.add_argument("--max-tokens", type=int, default=128, help="per answer")
    parser.add_argument(
        "--prompt", action="append", default=[], help="a user line (repeatable): run and exit"
    )
    parser.add_argument("--json", action="store_true", help="with --prompt: one JSON per turn")
    args = parser.parse_args(argv)
    if args.json and not args.prompt:
        parser.error("--json needs --prompt")

    model_dir = resolve_model(args.model)
    with ExitStack() as stack:
        kept = running_cluster(model_dir, NODES)
        if kept is not None:
            addrs = kept["addrs"]
            print(f"joining the kept pipeline (pids {kept['pids']})", file=sys.stderr)
        else:
            print(f"starting {NODES} stage processes for {model_dir.name}…", file=sys.stderr)
            # Entered on the stack: the processes stop however the chat ends.
            cluster = stack.enter_context(StageCluster(model_dir, NODES))
            addrs = cluster.addrs
        try:
            anyio.run(
                run_chat, addrs, model_dir, args.prompt, args.max_tokens, args.json, read_stdin_line
            )
        except KeyboardInterrupt:
            print(file=sys.stderr)
        except (PipelineError, StageFailedError, IncompleteStreamError) as exc:
            # The message names the stage and peer that failed, or the missing tokens.
            print(f"\nthree_node_chat: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
