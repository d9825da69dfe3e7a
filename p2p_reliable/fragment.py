"""Turning one application message into envelope payloads and back.

A message body is `content + xxh3-64(original payload)`, where content is the payload itself
or its zstd compression. The trailing digest makes the check end-to-end over the exact bytes
the application gave, after reassembly and decompression. Bodies larger than one fragment are
cut into consecutive pieces, each of which travels (and is checksummed) as its own envelope.
"""

from __future__ import annotations

import attrs
import xxhash
import zstandard

from .envelope import Flags

DIGEST_LEN = 8
_PROBE = 8192


class MessageTooLarge(ValueError):
    """The application tried to send more than `max_message_size` bytes."""


class ReassemblyError(ValueError):
    """Fragments joined into something that is not the message that was sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Split:
    """A message ready to send: its flags and the payload of each fragment in order."""

    flags: Flags
    pieces: list[bytes]


class MessageCodec:
    """Compression, fragmentation and the end-to-end digest, with their size limits."""

    def __init__(
        self,
        *,
        max_fragment_payload: int,
        max_message_size: int,
        compress_threshold: int,
        compress_level: int = 3,
        compress_max_size: int | None = None,
    ) -> None:
        self.max_fragment_payload = max_fragment_payload
        self.max_message_size = max_message_size
        self.compress_threshold = compress_threshold
        # Receivers decompress only within their byte credit for us; an empty one holds this
        # much, so larger messages travel as they are, however well they would compress.
        self.compress_max_size = (
            max_message_size if compress_max_size is None else compress_max_size
        )
        self._compressor = zstandard.ZstdCompressor(level=compress_level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()
        self._probe = zstandard.ZstdCompressor(level=1, write_content_size=False)

    def split(self, payload: bytes) -> Split:
        """Compress if worthwhile, append the digest, and cut into fragment payloads."""
        if len(payload) > self.max_message_size:
            raise MessageTooLarge(
                f"message of {len(payload)} bytes exceeds max_message_size {self.max_message_size}"
            )
        flags = Flags.NONE
        content: bytes = payload
        size = len(payload)
        if self.compress_threshold <= size <= self.compress_max_size and (
            self._looks_compressible(payload)
        ):
            packed = self._compressor.compress(payload)
            # Only keep compression that pays for the receiver's decompression time.
            if len(packed) < len(payload) * 0.9:
                content, flags = packed, Flags.COMPRESSED
        body = content + xxhash.xxh3_64_digest(payload)
        piece = self.max_fragment_payload
        return Split(flags, [body[i : i + piece] for i in range(0, len(body), piece)])

    def _looks_compressible(self, payload: bytes) -> bool:
        # Tensors and already-compressed data do not shrink; a fast probe of the first 8 KiB
        # spares compressing megabytes in vain (measured: ~1 ms per 256 KiB of random data).
        probe = payload[:_PROBE]
        return len(self._probe.compress(probe)) < len(probe) * 0.9

    def max_fragments(self) -> int:
        """The most fragments a message within the size limit can need."""
        return -(-(self.max_message_size + DIGEST_LEN) // self.max_fragment_payload)

    def declared_size(self, first_piece: bytes, flags: Flags) -> int | None:
        """The size a compressed message's first piece says it decompresses to; None if it is
        not compressed. Read from the zstd frame header, before anything is allocated."""
        if not flags & Flags.COMPRESSED:
            return None
        try:
            size = zstandard.frame_content_size(first_piece)
        except zstandard.ZstdError:
            raise ReassemblyError("compressed body is not a zstd frame") from None
        if size < 0:
            raise ReassemblyError("compressed body does not declare its size")
        return int(size)

    def join(self, pieces: list[bytes], flags: Flags, max_size: int | None = None) -> bytes:
        """Reassemble, decompress and verify a message; raise `ReassemblyError` if it is bad.

        A compressed message may decompress to at most `max_size` bytes (the receiver's credit
        for its publisher; `max_message_size` by default), checked before allocating.
        """
        limit = self.max_message_size if max_size is None else min(max_size, self.max_message_size)
        body = b"".join(pieces)
        if len(body) < DIGEST_LEN:
            raise ReassemblyError("message body shorter than its digest")
        content, digest = body[:-DIGEST_LEN], body[-DIGEST_LEN:]
        if flags & Flags.COMPRESSED:
            content = self._decompress(content, limit)
        if len(content) > self.max_message_size:
            raise ReassemblyError("message exceeds max_message_size")
        if xxhash.xxh3_64_digest(content) != digest:
            raise ReassemblyError("message digest mismatch")
        return content

    def _decompress(self, content: bytes, limit: int) -> bytes:
        size = self.declared_size(content, Flags.COMPRESSED)
        # zstandard trusts the size written in the frame header over max_output_size, so a
        # forged header could make us allocate anything: check it first.
        assert size is not None
        if size > limit:
            raise ReassemblyError(f"compressed body declares {size} bytes (limit {limit})")
        try:
            return self._decompressor.decompress(content, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise ReassemblyError(f"zstd: {exc}") from None
