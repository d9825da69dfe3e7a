"""`p2pr serve` on one machine (loopback): the cluster secret rules, the API's key rule, one
node alone serving the whole model through the API, and a node of another model refused.
Several machines: test_serve_netns.py."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from discovery.identity import IdentityError
from discovery.secret import load_or_create_secret
from inference_glue.client import load_tokenizer
from p2pr.cli import build_parser
from p2pr.commands.serve import DEFAULT_LISTEN, _cluster_secret, join_command
from p2pr.launch import Launched, stop_all
from p2pr.reference import run_reference

P2PR = str(Path(sys.executable).parent / "p2pr")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WAIT = 120.0  # the bound on every wait for an event


def test_a_secret_is_made_once_kept_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "p2pr" / "cluster.secret"
    secret, made = load_or_create_secret(path)
    assert made and len(secret) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == (secret, False)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_or_create_secret(path)
    path.chmod(0o600)
    path.write_text("two words\n")
    with pytest.raises(IdentityError, match="does not hold one secret"):
        load_or_create_secret(path)


def test_which_secret_a_node_listens_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P2PR_CLUSTER_SECRET", raising=False)
    secret_file = tmp_path / "cluster.secret"

    def secret(host: str, *argv: str) -> tuple[str | None, bool]:
        args = build_parser().parse_args(["serve", "--secret-file", str(secret_file), *argv])
        return _cluster_secret(args, host)

    assert secret("127.0.0.1") == (None, False)  # loopback: this machine alone
    assert not secret_file.exists()
    made, fresh = secret("0.0.0.0")
    assert fresh and secret_file.read_text().strip() == made
    assert secret("10.0.0.2") == (made, False)
    assert secret("0.0.0.0", "--cluster-secret", "given") == ("given", False)
    monkeypatch.setenv("P2PR_CLUSTER_SECRET", "from-env")
    assert secret("0.0.0.0") == ("from-env", False)
    with pytest.raises(ValueError, match="contradict"):
        secret("0.0.0.0", "--insecure")
    monkeypatch.delenv("P2PR_CLUSTER_SECRET")
    assert secret("0.0.0.0", "--insecure") == (None, False)


def test_the_join_command() -> None:
    addr = "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWabc"
    assert join_command("builtin", addr, "s3cret", DEFAULT_LISTEN) == [
        "p2pr", "serve", "--model", "builtin", "--bootstrap", addr, "--cluster-secret", "s3cret",
    ]  # fmt: skip
    assert join_command("m", addr, None, "/ip4/10.0.0.2/tcp/5000")[-3:] == [
        "--listen",
        "/ip4/0.0.0.0/tcp/5000",
        "--insecure",
    ]


def test_an_api_off_loopback_needs_a_key() -> None:
    out = subprocess.run(
        [P2PR, "serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", "none",
         "--api-port", "0", "--api-host", "0.0.0.0"],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "without an API key" in out.stderr and "--api-key" in out.stderr


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """`start(label, *args)`: a `p2pr serve` on 127.0.0.1, stopped at the end of the test."""
    started: list[Launched] = []

    def start(label: str, *args: str) -> Launched:
        argv = [P2PR, "serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", "none", *args]
        process = Launched(argv, label=label, log_path=tmp_path / f"{label}.log")
        started.append(process)
        return process

    yield start
    stop_all(started, timeout=10)


@pytest.mark.multinode
def test_one_node_alone_serves_the_model_and_refuses_another_model(
    serving: Callable[..., Launched], tiny_dir: Path, tiny_models: Callable[..., Path]
) -> None:
    alone = serving("alone", "--model", str(tiny_dir), "--model-name", "tiny", "--api-port", "0")
    ready = alone.expect("ready", WAIT)
    plan = alone.expect("plan", WAIT)
    assert plan["stages"] == [{"stage": 0, "node_id": ready["node_id"], "layers": [0, 6]}]
    port = alone.expect("api", WAIT)["port"]
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=WAIT
    )
    prompt = "One machine is enough"
    tokenizer = load_tokenizer(tiny_dir)
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )
    reference, chat_reference = run_reference(
        tiny_dir,
        [
            {"prompt_ids": tokenizer.encode(prompt), "max_tokens": 16},
            {"prompt_ids": chat_ids, "max_tokens": 12},
        ],
    )
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert first.choices[0].text == reference["text"]
    # examples/openai_client.py: the official client, streaming a chat.
    example = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_client.py"), prompt, "--json",
         "--base-url", f"http://127.0.0.1:{port}/v1", "--max-tokens", "12"],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert example.returncode == 0, example.stderr
    chatted = json.loads(example.stdout)
    assert chatted["text"] == chat_reference["text"] and chatted["model"] == "tiny"
    assert chatted["usage"]["completion_tokens"] == len(chat_reference["token_ids"])

    # Same tensor shapes, other weights (another seed): not mixed in, and both say why.
    stranger = serving("other", "--model", str(tiny_models(1)), "--bootstrap", ready["addrs"][0])
    other = stranger.expect("ready", WAIT)

    def refusal_of(peer: str) -> Callable[[dict[str, Any]], bool]:
        return lambda line: line.get("event") == "refused" and line["peer"] == peer

    told = alone.expect(refusal_of(other["node_id"]), WAIT)
    assert other["model"].rpartition("@")[2] in told["message"]
    assert "not mixed" in told["message"]
    assert stranger.expect(refusal_of(ready["node_id"]), WAIT)["model"] == ready["model"]
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert again.choices[0].text == reference["text"]
    stages = httpx.get(f"http://127.0.0.1:{port}/health", timeout=WAIT).json()["backend"]["stages"]
    assert [s["node_id"] for s in stages] == [ready["node_id"]]


@pytest.mark.multinode
def test_bench_api_measures_both_ways_into_one_pipeline(tiny_dir: Path) -> None:
    out = subprocess.run(
        [P2PR, "bench", "api", "--model", str(tiny_dir), "--runs", "2", "--max-tokens", "8",
         "--no-mlx-server", "--json"],
        capture_output=True, text=True, timeout=WAIT * 3,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert [r["way"] for r in result["rows"]] == ["p2pr generate (2 stages)", "API (2 stages)"]
    assert all(r["tokens"] == 8 and r["same_text"] for r in result["rows"])
    assert result["same_text_both_ways"]  # the API's text is generate's
    assert [c["clients"] for c in result["concurrency"]] == [1, 4, 8]
    assert all(c["same_text"] for c in result["concurrency"])
