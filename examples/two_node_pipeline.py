"""Two stage processes split one model; a prompt goes through both.

    .venv/bin/python examples/two_node_pipeline.py ["PROMPT"] [--model PATH] [--max-tokens N]

Starts two `python -m p2pr.stage_node` processes on 127.0.0.1 (`StageCluster`), each
with half of the layers (the first also embeds, the second also samples), joins them as a
client (`PipelineClient`), streams the answer, then prints where each layer ran. The
pipeline stops when the script ends. `--model` takes an mlx-lm directory, `builtin` (the
default, SmolLM2-135M-Instruct) or `tiny` (a seeded random test model); `--json` prints one
JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from inference_glue.client import PipelineClient
from p2pr.models import resolve_model
from p2pr.stage_cluster import StageCluster

NODES = 2


def prompt_text(tokenizer: Any, prompt: str, raw: bool) -> str:
    """The prompt as the model expects it: in its chat template, as `p2pr generate` does."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    text: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return text


async def generate(
    cluster: StageCluster, model_dir: Path, prompt: str, max_tokens: int, *, raw: bool, quiet: bool
) -> dict[str, Any]:
    """Join the cluster, stream one answer (to stdout unless `quiet`), describe the stages."""
    async with PipelineClient.connect(cluster.addrs, model_dir) as client:
        prompt_ids = client.encode_prompt(prompt_text(client.tokenizer, prompt, raw))
        chunks = []
        stream = client.stream(prompt_ids, max_tokens)
        async with aclosing(stream):
            async for chunk in stream:  # in order, each as soon as it is complete
                chunks.append(chunk)
                if not quiet:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        if not quiet:
            sys.stdout.write("\n")
        addrs = {node.node_id: node.addrs[0] for node in cluster.nodes}
        return {
            "model": model_dir.name,
            "prompt_ids": prompt_ids,
            "token_ids": [c.token_id for c in chunks],
            "text": "".join(c.text for c in chunks),
            "finish_reason": chunks[-1].finish_reason if chunks else None,
            # What each node says it serves (InfoReply), not what we asked it to.
            "placement": [
                {
                    "stage": s.index,
                    "node_id": s.node_id,
                    "layers": [s.layers.start, s.layers.stop],
                    "num_layers": s.num_layers,
                    "pid": s.pid,
                    "addr": addrs.get(s.node_id),
                    "blas": f"{s.blas} x{s.blas_threads}",
                }
                for s in client.stages
            ],
        }


def print_placement(result: dict[str, Any]) -> None:
    """One line per node: its stage, its layers and where it listens."""
    print(f"placement of {result['model']} ({result['placement'][0]['num_layers']} layers):")
    for p in result["placement"]:
        start, stop = p["layers"]
        role = ["embedding"] if p["stage"] == 0 else []
        role += [f"layers {start}-{stop - 1}"]
        role += ["norm + LM head + sampling"] if p["stage"] == len(result["placement"]) - 1 else []
        print(f"  stage {p['stage']}: {', '.join(role)}")
        print(f"           pid {p['pid']}, {p['blas']}, {p['addr']}")
    print(f"{len(result['token_ids'])} tokens, finish reason: {result['finish_reason']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--model", default="builtin", help="mlx-lm directory, builtin or tiny")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--raw", action="store_true", help="no chat template around the prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    model_dir = resolve_model(args.model)
    say = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr))
    # Leaving the `with` block stops both node processes, also on an error or Ctrl-C.
    with StageCluster(model_dir, NODES) as cluster:
        say(f"{NODES} stage processes ready: " + ", ".join(n.label for n in cluster.nodes))
        if not args.json:
            print(f"> {args.prompt}")
        run = partial(generate, raw=args.raw, quiet=args.json)
        result = anyio.run(run, cluster, model_dir, args.prompt, args.max_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        print_placement(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
