#!/usr/bin/env bash
# `make demo`: the whole story on one machine, with the built-in SmolLM2-135M-Instruct.
#   1. three stage processes on 127.0.0.1 split the model's 30 layers (p2pr pipeline up);
#   2. a client streams the answer to a prompt, token by token (p2pr generate);
#   3. one snapshot of every node's view of its peers (p2pr health --once);
#   4. the pipeline stops (p2pr pipeline down), also when a step fails;
#   5. a fresh pipeline is checked token for token against single-process mlx-lm (p2pr verify).
# DEMO_PROMPT="..." asks something else; DEMO_VERIFY=0 leaves out step 5.
set -euo pipefail
cd "$(dirname "$0")/.."

P2PR=.venv/bin/p2pr
NODES=3
PROMPT=${DEMO_PROMPT:-"What is the capital of France, and what is it famous for?"}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/5 p2pr pipeline up --nodes $NODES: stage processes for the built-in SmolLM2-135M-Instruct"
up=$("$P2PR" pipeline up --nodes "$NODES")
echo "$up"
if [[ $up == already* ]]; then
    # Someone kept this pipeline before the demo: it is theirs, so it keeps running.
    echo "(a kept pipeline was already running: the demo uses it and leaves it running)"
else
    trap '"$P2PR" pipeline down --nodes "$NODES" >/dev/null 2>&1 || true' EXIT
fi

step "2/5 p2pr generate: the answer streams in as the last stage samples each token"
echo "> $PROMPT"
"$P2PR" generate "$PROMPT" --nodes "$NODES" --max-tokens 64

step "3/5 p2pr health --once: every stage's view of the others (RTT from the protocol's heartbeats)"
"$P2PR" health --once

if [[ $up != already* ]]; then
    step "4/5 p2pr pipeline down"
    "$P2PR" pipeline down --nodes "$NODES"
    trap - EXIT
fi

if [[ ${DEMO_VERIFY:-1} != 0 ]]; then
    step "5/5 p2pr verify: a new $NODES-stage pipeline against single-process mlx-lm, token for token"
    # The table says it all; its JSON twin (the last line) is for scripts.
    "$P2PR" verify --nodes "$NODES" --max-tokens 16 | grep -v '^{'
fi
