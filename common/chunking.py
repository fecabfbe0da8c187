"""Artifact chunks on ``fogline/v1/artifacts/{a}/chunks``.

Each MQTT message is a fixed 64-byte header followed by the chunk bytes:
magic ``FGC1``, index, count, offset, total artifact size, and the chunk's
SHA-256, so a receiver rejects a damaged chunk cheaply. The header proves
nothing about who sent the chunk: anyone who can publish on the topic can make
a self-consistent one. What makes a chunk *the* chunk is the SHA-256 listed for
its index in the signed manifest (``Manifest.chunks``), which the Assembler
checks when it is given that list.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.errors import VerificationError

MAGIC = b"FGC1"
_HEADER = struct.Struct(">4sIIQQ32s4x")  # 64 bytes
HEADER_SIZE = _HEADER.size
DEFAULT_CHUNK_SIZE = 32 * 1024
# The signed chunk list rides in every per-device deploy command, so its length is
# capped: a big artifact gets bigger chunks rather than a longer list (see chunk_size_for).
MAX_CHUNKS = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 64
# What a signed manifest may list at most (an operator may pick a small size offline).
MAX_SIGNED_CHUNKS = 8 * MAX_CHUNKS


@dataclass(frozen=True)
class Chunk:
    index: int
    count: int
    offset: int
    total: int
    data: bytes
    # The SHA-256 of ``data`` as decode() computed it (None for a chunk cut here): the
    # Assembler compares it with the signed hash instead of hashing the bytes again.
    # NOTE: init=False, so that dataclasses.replace(chunk, data=...) cannot carry it over.
    sha256: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def encode(self) -> bytes:
        digest = hashlib.sha256(self.data).digest()
        header = _HEADER.pack(MAGIC, self.index, self.count, self.offset, self.total, digest)
        return header + self.data


def chunk_count(total: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    return max(1, -(-total // chunk_size))


def chunk_size_for(total: int, minimum: int = DEFAULT_CHUNK_SIZE) -> int:
    """The chunk size for an artifact of ``total`` bytes: ``minimum``, doubled until
    the artifact fits in MAX_CHUNKS chunks (90 MB at 32 KiB -> 128 KiB, 720 chunks).

    Why not always 32 KiB: 2,800 hashes would add ~190 KB to every deploy command
    (one per device), and a repair request could list 2,800 indices.
    """
    if not 1 <= minimum <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_SIZE}, got {minimum}")
    size = minimum
    while chunk_count(total, size) > MAX_CHUNKS and size < MAX_CHUNK_SIZE:
        size *= 2
    return min(size, MAX_CHUNK_SIZE)


def chunk_hashes(data: bytes, chunk_size: int) -> list[str]:
    """The SHA-256 (hex) of each chunk of ``data``, in index order."""
    return [hashlib.sha256(c.data).hexdigest() for c in split(data, chunk_size)]


def chunk_at(data: bytes, index: int, chunk_size: int) -> Chunk:
    """One chunk of ``data``, for resending just that index without splitting it all."""
    count = chunk_count(len(data), chunk_size)
    if not 0 <= index < count:
        raise IndexError(f"chunk {index} outside 0..{count - 1}")
    off = index * chunk_size
    return Chunk(index, count, off, len(data), data[off : off + chunk_size])


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
    # NOTE: hashed once per chunk; the Assembler reuses this digest against the signed
    # list (a fleet of simulated devices on one host spent half its CPU hashing twice).
    actual = hashlib.sha256(data).digest()
    if actual != digest:
        raise VerificationError(f"chunk {index} does not match its SHA-256")
    if index >= count or offset + len(data) > total:
        raise VerificationError(f"chunk {index} lies outside the artifact")
    chunk = Chunk(index, count, offset, total, data)
    object.__setattr__(chunk, "sha256", actual)  # frozen: set once, here
    return chunk


class Assembler:
    """Collects the chunks of one artifact, in any order, with a fixed total size.

    NOTE: the total, the chunk size and ``hashes`` come from the signed manifest,
    never from a chunk header, so a hostile sender can neither make the receiver
    buffer more than it expects nor get a forged chunk into an index's place:
    with ``hashes``, a chunk that does not match its signed hash is refused and
    the real one is still accepted when it comes. (Without ``hashes`` -- a
    package signed before chunk lists existed -- the first self-consistent copy
    wins and only the whole artifact's digest catches a forgery.)
    """

    def __init__(
        self, total: int, chunk_size: int, hashes: list[str] | None = None, *, keep: bool = True
    ) -> None:
        self.total = total
        self.chunk_size = chunk_size
        self.count = chunk_count(total, chunk_size)
        if hashes is not None and len(hashes) != self.count:
            raise VerificationError(f"{len(hashes)} chunk hashes for {self.count} chunks")
        if not keep and hashes is None:
            raise ValueError("verifying without keeping the bytes needs the signed chunk hashes")
        try:
            self._hashes = [bytes.fromhex(h) for h in hashes] if hashes is not None else None
        except ValueError:
            raise VerificationError("the signed chunk list holds a malformed hash") from None
        # keep=False: verify each chunk against its signed hash and keep no bytes (the
        # fleet simulator: a thousand devices cannot each hold the artifact on one host).
        self._buf: bytearray | None = bytearray(total) if keep else None
        self._have: set[int] = set()

    def add(self, chunk: Chunk) -> bool:
        """Store a chunk that decode() accepted; True if it was new.

        Raise VerificationError if it does not fit or does not match its signed hash.
        """
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
        if (
            self._hashes is not None
            and (chunk.sha256 or hashlib.sha256(chunk.data).digest()) != self._hashes[chunk.index]
        ):
            raise VerificationError(f"chunk {chunk.index} does not match the signed manifest")
        if self._buf is not None:
            self._buf[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        self._have.add(chunk.index)
        return True

    @property
    def received(self) -> int:
        return len(self._have)

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self._have]

    @property
    def complete(self) -> bool:
        return len(self._have) == self.count

    def data(self) -> bytes:
        """The artifact (empty when built with ``keep=False``: every chunk was verified)."""
        if not self.complete:
            raise VerificationError(f"artifact incomplete: {len(self.missing)} chunks missing")
        return bytes(self._buf) if self._buf is not None else b""
