"""The token stream: `TokenChunk` messages, their producer and the receiver's assembler.

The last pipeline stage turns each sampled token into a `TokenChunk` with
`TokenStreamWriter`, which takes the text from mlx-lm's streaming detokenizer, so a
multi-byte character split over several tokens arrives whole in one chunk, never as
replacement characters. Receivers feed chunks, in whatever order the network delivers them,
to a `TokenStreamAssembler`: it reorders, drops duplicates and corrupted chunks, reports
gaps for repair, and at the end either returns the complete text or raises an error that
names what is missing; it never returns a silently shortened text.

Chunk semantics follow `mlx_lm.stream_generate` exactly: one chunk per generated token;
the last chunk has `finish_reason` "length" (its token is part of the text) or "stop" (its
token is the end-of-sequence token, which is not detokenized).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import msgpack
import xxhash
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from p2p_reliable import schema

__all__ = [
    "FINISH_REASONS",
    "AssemblerStats",
    "IncompleteStreamError",
    "TextMismatchError",
    "TokenChunk",
    "TokenChunkDecodeError",
    "TokenStreamAssembler",
    "TokenStreamWriter",
    "expected_stream_text",
    "format_ranges",
]

FINISH_REASONS = ("stop", "length")
_WIRE_VERSION = 1


# The wire form of a chunk (checked field by field by the project's one schema converter).
_WireChunk = tuple[int, str, int, int, str, str | None, int]
_MAX_CHUNK_BYTES = 64 * 1024


class TokenChunkDecodeError(ValueError):
    """Bytes that are not a valid `TokenChunk`, or whose checksum does not match."""


class IncompleteStreamError(Exception):
    """A token stream that cannot be completed: chunks are missing, or no finish chunk came."""

    def __init__(
        self,
        request_id: str,
        missing: list[range],
        finished: bool,
        source: str | None,
        received: int,
        highest: int,
    ) -> None:
        self.request_id = request_id
        self.missing = missing
        self.finished = finished
        self.source = source
        problems = []
        if missing:
            problems.append(f"missing seq {format_ranges(missing)}")
        if not finished:
            last = f"after seq {highest}" if highest >= 0 else "and no chunk at all"
            problems.append(f"no finish chunk received {last}")
        origin = f" from {source}" if source else ""
        super().__init__(
            f"request {request_id!r}: token stream{origin} is incomplete: "
            f"{'; '.join(problems)} ({received} chunks received)"
        )


class TextMismatchError(Exception):
    """The joined chunk texts differ from the tokenizer's decoding of the token ids."""

    def __init__(self, request_id: str, joined: str, expected: str) -> None:
        self.request_id = request_id
        self.joined = joined
        self.expected = expected
        at = next(
            (i for i, (a, b) in enumerate(zip(joined, expected)) if a != b),
            min(len(joined), len(expected)),
        )
        super().__init__(
            f"request {request_id!r}: joined chunk text ({len(joined)} chars) differs from "
            f"tokenizer.decode(token ids) ({len(expected)} chars) at char {at}: "
            f"{joined[at : at + 20]!r} != {expected[at : at + 20]!r}"
        )


def format_ranges(ranges: Sequence[range]) -> str:
    """'3-5, 9' for [range(3, 6), range(9, 10)]."""
    return ", ".join(str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}" for r in ranges)


def _chunk_checksum(
    request_id: str, seq: int, token_id: int, text: str, finish_reason: str | None
) -> int:
    packed = msgpack.packb([request_id, seq, token_id, text, finish_reason])
    return xxhash.xxh3_64_intdigest(packed)


@attrs.frozen
class TokenChunk:
    """One generated token of request `request_id`: its number `seq` (0-based), id and text.

    `checksum` is xxh3-64 over msgpack([request_id, seq, token_id, text, finish_reason]);
    build chunks with `TokenChunk.create`, which computes it.
    """

    request_id: str
    seq: int
    token_id: int
    text: str
    finish_reason: str | None
    checksum: int

    @classmethod
    def create(
        cls,
        request_id: str,
        seq: int,
        token_id: int,
        text: str,
        finish_reason: str | None = None,
    ) -> TokenChunk:
        """A chunk with its checksum computed."""
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        if finish_reason is not None and finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None")
        checksum = _chunk_checksum(request_id, seq, token_id, text, finish_reason)
        return cls(request_id, seq, token_id, text, finish_reason, checksum)

    @property
    def checksum_ok(self) -> bool:
        """True when `checksum` matches the other fields."""
        return self.checksum == _chunk_checksum(
            self.request_id, self.seq, self.token_id, self.text, self.finish_reason
        )

    def to_bytes(self) -> bytes:
        """msgpack([version, request_id, seq, token_id, text, finish_reason, checksum])."""
        fields = attrs.astuple(self)
        return msgpack.packb([_WIRE_VERSION, *fields])  # type: ignore[no-any-return]

    @classmethod
    def from_bytes(cls, data: bytes, *, verify: bool = True) -> TokenChunk:
        """Decode `to_bytes` output.

        Raises:
            TokenChunkDecodeError: malformed bytes, or (with `verify`) a checksum mismatch.
        """
        try:
            fields = schema.decode(data, _WireChunk, max_bytes=_MAX_CHUNK_BYTES)
        except schema.SchemaError as exc:
            raise TokenChunkDecodeError(f"token chunk: {exc}") from None
        version, request_id, seq, token_id, text, finish_reason, checksum = fields
        if version != _WIRE_VERSION or seq < 0:
            raise TokenChunkDecodeError("token chunk has the wrong version or a negative seq")
        if finish_reason is not None and finish_reason not in FINISH_REASONS:
            raise TokenChunkDecodeError(
                f"token chunk has an unknown finish reason {finish_reason!r}"
            )
        chunk = cls(request_id, seq, token_id, text, finish_reason, checksum)
        if verify and not chunk.checksum_ok:
            raise TokenChunkDecodeError(f"token chunk {request_id!r} seq {seq}: checksum mismatch")
        return chunk


class TokenStreamWriter:
    """Turns one request's generated tokens into `TokenChunk`s, as `stream_generate` does.

    The text of each chunk is what mlx-lm's streaming detokenizer releases after that token
    (its `last_segment`): bytes of an unfinished UTF-8 character are held back until the
    character is complete, so no chunk ever carries half an emoji.

    A writer that takes over a stream after a failover starts from `resume`, the tokens an
    earlier writer already turned into chunks: it feeds them to its detokenizer without
    making chunks, so its next chunk has seq `len(resume)` and exactly the text the earlier
    writer would have given it (held-back bytes of a character included).
    """

    def __init__(self, request_id: str, tokenizer: Any, resume: Sequence[int] = ()) -> None:
        self.request_id = request_id
        self._detokenizer = tokenizer.detokenizer  # a fresh copy per access
        for token_id in resume:
            self._detokenizer.add_token(token_id)
        _ = self._detokenizer.last_segment  # consumed: those chunks were sent before
        self._seq = len(resume)
        self._finished = False

    def chunk(self, token_id: int, finish_reason: str | None = None) -> TokenChunk:
        """The chunk for the next token; `finish_reason` "stop" marks an end-of-sequence
        token (not detokenized), "length" a last token that is part of the text."""
        if self._finished:
            raise RuntimeError(f"request {self.request_id!r}: the stream is already finished")
        if finish_reason != "stop":
            self._detokenizer.add_token(token_id)
        if finish_reason is not None:
            self._detokenizer.finalize()
            self._finished = True
        chunk = TokenChunk.create(
            self.request_id, self._seq, token_id, self._detokenizer.last_segment, finish_reason
        )
        self._seq += 1
        return chunk


def expected_stream_text(
    tokenizer: Any, token_ids: Sequence[int], finish_reason: str | None
) -> str:
    """The text a complete stream must join to: `tokenizer.decode` of its text tokens.

    The text tokens are all the chunks' tokens but a final "stop" token (end of sequence,
    never detokenized). mlx-lm's byte-level BPE streaming detokenizer drops one space at the
    very start of a stream (`BPEStreamingDetokenizer._maybe_trim_space`), so the decoded
    text does too for such tokenizers.

    Known mlx-lm 0.32 difference, reported rather than hidden: that detokenizer turns a NUL
    byte (token "Ā") into "Ā", so a stream containing NUL fails the check.
    """
    ids = list(token_ids[:-1] if finish_reason == "stop" else token_ids)
    text: str = tokenizer.decode(ids)
    if isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer) and text.startswith(" "):
        text = text[1:]
    return text


@attrs.define
class AssemblerStats:
    """What an assembler received besides the chunks it used."""

    duplicates: int = 0
    corrupted: int = 0
    foreign: int = 0
    conflicts: int = 0
    beyond_end: int = 0


class TokenStreamAssembler:
    """Rebuilds one request's token stream from chunks that may arrive in any order.

    `add` returns the chunks that became deliverable in order; duplicates are dropped and
    counted, chunks with a bad checksum, of another request, or after the finish chunk are
    rejected and counted (see `stats`). `missing()` lists the gaps to ask for again; once they
    are filled, `finish()` returns the text.

    Args:
        request_id: the request whose chunks this assembles.
        tokenizer: if given, `finish()` also checks the joined text against
            `tokenizer.decode(token ids)` (see `expected_stream_text`).
        source: the stage or peer the chunks come from, named in `IncompleteStreamError`.
    """

    def __init__(self, request_id: str, tokenizer: Any = None, source: str | None = None) -> None:
        self.request_id = request_id
        self.tokenizer = tokenizer
        self.source = source
        self.stats = AssemblerStats()
        self._delivered: list[TokenChunk] = []
        self._pending: dict[int, TokenChunk] = {}
        self._highest = -1
        self._finish_seq: int | None = None

    @property
    def chunks(self) -> list[TokenChunk]:
        """The chunks delivered so far, in order."""
        return list(self._delivered)

    @property
    def complete(self) -> bool:
        """True once every chunk up to and including the finish chunk has been delivered."""
        return self._finish_seq is not None and len(self._delivered) == self._finish_seq + 1

    def add(self, chunk: TokenChunk) -> list[TokenChunk]:
        """Take one received chunk; return the chunks that are now ready, in order."""
        if chunk.request_id != self.request_id:
            self.stats.foreign += 1
            return []
        if not chunk.checksum_ok:
            self.stats.corrupted += 1
            return []
        if self._finish_seq is not None and chunk.seq > self._finish_seq:
            self.stats.beyond_end += 1
            return []
        known = (
            self._delivered[chunk.seq]
            if chunk.seq < len(self._delivered)
            else self._pending.get(chunk.seq)
        )
        if known is not None:
            # A different chunk under a known seq means the producer is not deterministic;
            # the first one stays, and the conflict is counted for the operator to see.
            if known != chunk:
                self.stats.conflicts += 1
            else:
                self.stats.duplicates += 1
            return []
        if chunk.finish_reason is not None:
            if chunk.seq < self._highest:
                # A finish chunk before chunks already seen contradicts them.
                self.stats.conflicts += 1
                return []
            self._finish_seq = chunk.seq
        self._pending[chunk.seq] = chunk
        self._highest = max(self._highest, chunk.seq)
        ready = []
        while len(self._delivered) in self._pending:
            ready.append(self._pending.pop(len(self._delivered)))
            self._delivered.append(ready[-1])
        return ready

    def missing(self) -> list[range]:
        """The gaps, as ranges of seq, below the highest seq seen (or the finish seq)."""
        top = self._finish_seq if self._finish_seq is not None else self._highest
        gaps: list[range] = []
        start: int | None = None
        for seq in range(len(self._delivered), top + 1):
            if seq in self._pending:
                if start is not None:
                    gaps.append(range(start, seq))
                    start = None
            elif start is None:
                start = seq
        if start is not None:
            gaps.append(range(start, top + 1))
        return gaps

    def rekey(self, request_id: str) -> int:
        """Take the rest of the stream from a new attempt, `request_id`, after a failover.

        The chunks delivered in order stay; chunks held beyond a hole are dropped (the new
        attempt produces them again), and chunks of the old id count as foreign from now on.
        Returns the seq the new attempt must start from.
        """
        self.request_id = request_id
        self._pending.clear()
        self._highest = len(self._delivered) - 1
        if self._finish_seq is not None and self._finish_seq >= len(self._delivered):
            self._finish_seq = None
        return len(self._delivered)

    def text_so_far(self) -> str:
        """The text of the chunks delivered in order so far."""
        return "".join(c.text for c in self._delivered)

    def finish(self) -> str:
        """The complete text of the stream.

        Raises:
            IncompleteStreamError: a chunk is missing or no finish chunk was received; the
                message names the missing seq ranges and the source.
            TextMismatchError: with a tokenizer, the joined text differs from the decoding
                of the token ids.
        """
        if not self.complete:
            raise IncompleteStreamError(
                self.request_id,
                self.missing(),
                self._finish_seq is not None,
                self.source,
                len(self._delivered) + len(self._pending),
                self._highest,
            )
        text = self.text_so_far()
        if self.tokenizer is not None:
            last = self._delivered[-1]
            expected = expected_stream_text(
                self.tokenizer, [c.token_id for c in self._delivered], last.finish_reason
            )
            if text != expected:
                raise TextMismatchError(self.request_id, text, expected)
        return text
