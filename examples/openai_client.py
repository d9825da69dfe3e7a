"""Chat with a `p2pr serve` cluster through its OpenAI-compatible API, with the official
`openai` Python client (any OpenAI-compatible client works the same way).

    p2pr serve --model builtin --api-port 8000          # in another terminal (or machine)
    .venv/bin/python examples/openai_client.py "What is the capital of France?"
        [--base-url http://127.0.0.1:8000/v1] [--api-key KEY] [--max-tokens N]
        [--temperature T] [--seed S] [--no-stream] [--json]

The model is the one the server names (`GET /v1/models`). The answer streams in as the
pipeline's last stage samples it; then the token counts, the time to the first token and
the decode rate go to standard error. An API bound off loopback takes a key (`--api-key` or
`P2PR_API_KEY`, sent as `Authorization: Bearer KEY`). `--json` prints one JSON object
instead: model, text, finish reason, usage, ttft_s, tokens_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import openai


def chat(client: openai.OpenAI, args: argparse.Namespace) -> dict[str, Any]:
    """One chat completion, streamed to stdout unless `--json` or `--no-stream`."""
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]
    options: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    start = time.perf_counter()
    if args.no_stream:
        reply = client.chat.completions.create(**options)
        elapsed = time.perf_counter() - start
        usage = reply.usage.model_dump() if reply.usage else {}
        text = reply.choices[0].message.content or ""
        return _result(model, text, reply.choices[0].finish_reason, usage, None, elapsed)
    pieces: list[str] = []
    first: float | None = None
    finish, usage = None, {}
    stream = client.chat.completions.create(
        **options, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        if choice.delta.content:
            first = first or time.perf_counter()
            pieces.append(choice.delta.content)
            if not args.json:
                print(choice.delta.content, end="", flush=True)
    if not args.json:
        print()
    elapsed = time.perf_counter() - start
    ttft = None if first is None else first - start
    return _result(model, "".join(pieces), finish, usage, ttft, elapsed)


def _result(
    model: str,
    text: str,
    finish: str | None,
    usage: dict[str, Any],
    ttft: float | None,
    elapsed: float,
) -> dict[str, Any]:
    tokens = int(usage.get("completion_tokens") or 0)
    decode = elapsed - (ttft or 0.0)
    rate = (tokens - 1) / decode if ttft is not None and tokens > 1 and decode > 0 else None
    return {
        "model": model,
        "text": text,
        "finish_reason": finish,
        "usage": usage,
        "ttft_s": None if ttft is None else round(ttft, 4),
        "tokens_per_s": None if rate is None else round(rate, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("P2PR_API_KEY", "none"))
    parser.add_argument("--model", default=None, help="default: the one the server names")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="one response at the end")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    try:
        result = chat(client, args)
    except openai.APIConnectionError as exc:
        print(f"cannot reach {args.base_url}: {exc} (is `p2pr serve --api-port` running?)",
              file=sys.stderr)  # fmt: skip
        return 1
    except openai.APIStatusError as exc:
        print(f"the API refused: {exc.status_code} {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        usage = result["usage"]
        print(
            f"[{result['model']}: {usage.get('prompt_tokens')} prompt + "
            f"{usage.get('completion_tokens')} completion tokens, finish "
            f"{result['finish_reason']}, first token after {result['ttft_s']} s, "
            f"{result['tokens_per_s']} tok/s]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
