"""Failover demo: a node of a 3-node pipeline is killed in the middle of an answer.

    python examples/failover_demo.py [--model builtin|tiny|DIR] [--kill-after 12] [--kill 1]

Starts three stage processes on 127.0.0.1, streams the answer to a prompt, and SIGKILLs one
stage (the middle one by default) after `--kill-after` tokens. The client notices (the
connection closes), re-plans the layers over the two nodes left, they load the missing
layers from their own copy of the model, replay the prompt and the tokens so far, and the
stream goes on. At the end the answer is compared with a single-device run of mlx-lm.
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio

from inference_glue.client import PipelineClient
from inference_glue.local_pipeline import prompt_token_ids
from p2pr.models import resolve_model
from p2pr.reference import run_reference
from p2pr.stage_cluster import StageCluster


async def demo(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model)
    print(f"starting 3 stage processes for {model_dir.name} …", file=sys.stderr)
    with StageCluster(model_dir, 3) as cluster:
        async with PipelineClient.connect(cluster.addrs, model_dir) as client:
            for stage in client.stages:
                print(
                    f"  stage {stage.index}: layers {stage.layers.start}-{stage.layers.stop - 1}"
                    f" on {stage.node_id[-8:]} (pid {stage.pid})"
                )
            messages = [{"role": "user", "content": args.prompt}]
            prompt = client.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = prompt_token_ids(client.tokenizer, prompt)
            print(f"\n> {args.prompt}\n")
            killed_at = 0.0
            tokens: list[int] = []
            async for chunk in client.stream(ids, args.max_tokens, temp=args.temp, seed=args.seed):
                print(chunk.text, end="", flush=True)
                tokens.append(chunk.token_id)
                if chunk.seq + 1 == args.kill_after:
                    killed_at = cluster.kill(args.kill)
                    print(f" [SIGKILL stage {args.kill}] ", end="", flush=True)
            print("\n")
    for event in client.events:
        print(f"  event: {event.line()}")
    for recovery in client.recoveries:
        print(
            f"  recovered: first new token {recovery.first_token_at - killed_at:.2f} s after "
            f"the SIGKILL (detected in {recovery.detected_at - killed_at:.2f} s, re-planned in "
            f"{recovery.replan_seconds:.2f} s, {recovery.resumed_from} tokens replayed); "
            f"layers now {[list(r) for r in recovery.layers]}"
        )
    case = {"prompt_ids": ids, "max_tokens": args.max_tokens, "temp": args.temp, "seed": args.seed}
    expected = run_reference(model_dir, [case])[0]
    same = expected["token_ids"] == tokens
    print(f"  identical to single-device mlx-lm: {'yes' if same else 'NO'}")
    return 0 if same and client.recoveries else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="builtin, tiny, or an mlx-lm directory")
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--kill-after", type=int, default=12, help="tokens before the SIGKILL")
    parser.add_argument("--kill", type=int, default=1, choices=[1, 2], help="stage to kill")
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    started = time.perf_counter()
    code = anyio.run(demo, parser.parse_args())
    print(f"  ({time.perf_counter() - started:.1f} s in all)", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
