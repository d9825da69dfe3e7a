"""Helpers the test folders share (fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pr.launch import Launched, child_environment, python_module

__all__ = ["P2prNode", "expected_deltas"]


def expected_deltas(tokenizer: Any, reference: dict[str, Any]) -> list[str]:
    """The texts mlx-lm's streaming detokenizer gives for the reference's tokens (as
    `stream_generate` yields them), empty ones left out as the API leaves them out."""
    from inference_glue.tokens import TokenStreamWriter

    writer = TokenStreamWriter("x", tokenizer)
    ids = reference["token_ids"]
    texts = [
        writer.chunk(t, reference["finish_reason"] if i == len(ids) - 1 else None).text
        for i, t in enumerate(ids)
    ]
    assert "".join(texts) == reference["text"]
    return [t for t in texts if t]


class P2prNode:
    """A `p2pr node` process, up: its peer id, first address and ready event (its standard
    error goes to `log_path` when given, else a tail is kept)."""

    def __init__(
        self,
        *args: str,
        faults: str | None = None,
        timeout: float = 60.0,
        log_path: Path | None = None,
    ) -> None:
        extra = {"P2PR_FAULTS": faults} if faults else None
        self.process = Launched(
            python_module("p2pr", "node", *args),
            label=f"p2pr node {' '.join(args)}",
            env=child_environment(extra),
            log_path=log_path,
        )
        self.ready = self.process.expect("ready", timeout)
        self.node_id: str = self.ready["node_id"]
        self.addr: str = self.ready["addrs"][0]

    @property
    def proc(self) -> Any:
        """The node's `subprocess.Popen`."""
        return self.process.proc

    def stop(self) -> None:
        """SIGTERM (it closes its connections), then SIGKILL if it does not leave."""
        self.process.stop(timeout=10)
