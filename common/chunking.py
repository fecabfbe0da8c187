"""Artifact chunks on ``fogline/v1/artifacts/{a}/chunks``.

Each MQTT message is a fixed 64-byte header followed by the chunk bytes:
magic ``FGC1``, index, count, offset, total artifact size, and the chunk's
SHA-256, so a receiver rejects a damaged chunk before it touches the disk.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from common.errors import VerificationError

MAGIC = b"FGC1"
_HEADER = struct.Struct(">4sIIQQ32s4x")  # 64 bytes
HEADER_SIZE = _HEADER.size
DEFAULT_CHUNK_SIZE = 32 * 1024


@dataclass(frozen=True)
class Chunk:
    index: int
    count: int
    offset: int
    total: int
    data: bytes

    def encode(self) -> bytes:
        digest = hashlib.sha256(self.data).digest()
        header = _HEADER.pack(MAGIC, self.index, self.count, self.offset, self.total, digest)
        return header + self.data


def chunk_count(total: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    return max(1, -(-total // chunk_size))


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[Chunk]:
    count = chunk_count(len(data), chunk_size)
    for i in range(count):
        off = i * chunk_size
        yield Chunk(i, count, off, len(data), data[off : off + chunk_size])


def decode(payload: bytes) -> Chunk:
    """Parse and check one chunk message; raise VerificationError if damaged."""
    if len(payload) < HEADER_SIZE:
        raise VerificationError("chunk shorter than its header")
    magic, index, count, offset, total, digest = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise VerificationError("chunk has a bad magic number")
    data = payload[HEADER_SIZE:]
    if hashlib.sha256(data).digest() != digest:
        raise VerificationError(f"chunk {index} does not match its SHA-256")
    if index >= count or offset + len(data) > total:
        raise VerificationError(f"chunk {index} lies outside the artifact")
    return Chunk(index, count, offset, total, data)


class Assembler:
    """Collects the chunks of one artifact, in any order, with a fixed total size.

    NOTE: the total comes from the signed manifest, never from a chunk header,
    so a hostile sender cannot make the receiver buffer more than it expects.
    """

    def __init__(self, total: int, chunk_size: int) -> None:
        self.total = total
        self.chunk_size = chunk_size
        self.count = chunk_count(total, chunk_size)
        self._buf = bytearray(total)
        self._have: set[int] = set()

    def add(self, chunk: Chunk) -> bool:
        """Store a checked chunk; True if it was new."""
        expected_len = min(self.chunk_size, self.total - chunk.index * self.chunk_size)
        if (
            chunk.total != self.total
            or chunk.count != self.count
            or chunk.offset != chunk.index * self.chunk_size
            or len(chunk.data) != expected_len
        ):
            raise VerificationError(f"chunk {chunk.index} does not fit this artifact")
        if chunk.index in self._have:
            return False
        self._buf[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        self._have.add(chunk.index)
        return True

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self._have]

    @property
    def complete(self) -> bool:
        return len(self._have) == self.count

    def data(self) -> bytes:
        if not self.complete:
            raise VerificationError(f"artifact incomplete: {len(self.missing)} chunks missing")
        return bytes(self._buf)
