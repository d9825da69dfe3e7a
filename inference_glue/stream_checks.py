"""How a request's token stream ends badly: `TokenStreamError` (it cannot be completed,
naming the missing seq ranges and the stage and peer the chunks come from) and the check of
a complete stream's text against mlx-lm's own streaming detokenizer."""

from __future__ import annotations

from typing import Any, NoReturn

from inference_glue.tokens import (
    IncompleteStreamError,
    TextMismatchError,
    TokenStreamAssembler,
    TokenStreamWriter,
)

__all__ = ["TokenStreamError", "check_stream_text", "raise_incomplete"]


class TokenStreamError(IncompleteStreamError):
    """A token stream that cannot be completed, with the reason; names the missing seq
    ranges and the stage and peer that publish the stream."""

    def __init__(self, base: IncompleteStreamError, reason: str) -> None:
        self.request_id = base.request_id
        self.missing = base.missing
        self.finished = base.finished
        self.source = base.source
        self.reason = reason
        Exception.__init__(self, f"{base}; {reason}")


def raise_incomplete(assembler: TokenStreamAssembler, reason: str) -> NoReturn:
    """Raise `TokenStreamError` for the stream `assembler` could not complete."""
    try:
        assembler.finish()
    except IncompleteStreamError as exc:
        raise TokenStreamError(exc, reason) from None
    raise AssertionError("a complete stream has no trouble")


def check_stream_text(tokenizer: Any, assembler: TokenStreamAssembler) -> str:
    """The complete stream's text, after checking every chunk's text against what mlx-lm's
    streaming detokenizer (stream_generate's) gives for the same token ids.

    Raises:
        IncompleteStreamError: the stream is not complete.
        TextMismatchError: some chunk's text differs.
    """
    text = assembler.finish()
    replay = TokenStreamWriter(assembler.request_id, tokenizer)
    chunks = assembler.chunks
    expected = [replay.chunk(c.token_id, c.finish_reason).text for c in chunks]
    if expected != [c.text for c in chunks]:
        raise TextMismatchError(assembler.request_id, text, "".join(expected))
    return text
