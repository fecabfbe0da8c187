"""Chunk codec and assembly: any order, duplicates, damage, and hostile headers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import chunking
from common.errors import VerificationError


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=5000), size=st.integers(1, 700), seed=st.integers())
def test_split_then_assemble_in_any_order_round_trips(data: bytes, size: int, seed: int) -> None:
    chunks = [chunking.decode(c.encode()) for c in chunking.split(data, size)]
    random.Random(seed).shuffle(chunks)
    asm = chunking.Assembler(len(data), size)
    for c in chunks + chunks[:2]:  # duplicates are ignored
        asm.add(c)
    assert asm.complete and asm.missing == []
    assert asm.data() == data


def test_damaged_chunk_is_rejected() -> None:
    payload = bytearray(next(chunking.split(b"x" * 100, 64)).encode())
    payload[-1] ^= 1
    with pytest.raises(VerificationError, match="SHA-256"):
        chunking.decode(bytes(payload))
    with pytest.raises(VerificationError):
        chunking.decode(b"short")
    with pytest.raises(VerificationError, match="magic"):
        chunking.decode(b"XXXX" + bytes(payload[4:]))


def test_missing_chunks_are_reported_and_block_completion() -> None:
    data = bytes(range(256)) * 10
    asm = chunking.Assembler(len(data), 512)
    for c in chunking.split(data, 512):
        if c.index != 2:
            asm.add(c)
    assert asm.missing == [2]
    with pytest.raises(VerificationError, match="incomplete"):
        asm.data()


def test_chunk_from_another_artifact_does_not_fit() -> None:
    asm = chunking.Assembler(1000, 100)
    other = next(chunking.split(b"y" * 5000, 100))  # valid digest, wrong total
    with pytest.raises(VerificationError, match="does not fit"):
        asm.add(other)


# -- the signed chunk list -------------------------------------------------------------


def _forge(chunk: chunking.Chunk) -> chunking.Chunk:
    """Same index, offsets and length; other bytes (a self-consistent header once encoded)."""
    return chunking.Chunk(
        chunk.index, chunk.count, chunk.offset, chunk.total, bytes(b ^ 0x5A for b in chunk.data)
    )


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=4000), size=st.integers(1, 600), seed=st.integers())
def test_forged_copies_never_take_an_index_and_real_ones_still_fit(
    data: bytes, size: int, seed: int
) -> None:
    """Forgeries of every chunk arrive first, in any order; the real ones still complete it."""
    hashes = chunking.chunk_hashes(data, size)
    asm = chunking.Assembler(len(data), size, hashes)
    real = list(chunking.split(data, size))
    forged = [chunking.decode(_forge(c).encode()) for c in real]  # passes the header check
    rng = random.Random(seed)
    rng.shuffle(forged)
    rng.shuffle(real)
    for c in forged:  # every byte differs from the real chunk at that index
        with pytest.raises(VerificationError, match="signed manifest"):
            asm.add(c)
    assert sorted(asm.missing) == list(range(len(hashes)))
    for c in real:
        assert asm.add(chunking.decode(c.encode()))
    assert asm.data() == data
    for c in forged:  # late forgeries change nothing
        asm.add(c)
    assert asm.data() == data


def test_hash_list_must_match_the_chunk_count() -> None:
    with pytest.raises(VerificationError, match="3 chunk hashes for 2 chunks"):
        chunking.Assembler(200, 100, ["0" * 64] * 3)


@pytest.mark.parametrize(
    ("total", "minimum", "expected"),
    [
        (0, 32 * 1024, 32 * 1024),
        (7_112, 1024, 1024),
        (32 * 1024 * 1024, 32 * 1024, 32 * 1024),  # exactly 1024 chunks: no change
        (32 * 1024 * 1024 + 1, 32 * 1024, 64 * 1024),
        (90_000_000, 32 * 1024, 128 * 1024),  # 687 chunks instead of 2,747
        (10 * 1024**3, 32 * 1024, chunking.MAX_CHUNK_SIZE),  # capped: more chunks then
    ],
)
def test_chunk_size_grows_with_the_artifact(total: int, minimum: int, expected: int) -> None:
    assert chunking.chunk_size_for(total, minimum) == expected


def test_chunk_at_matches_split() -> None:
    data = bytes(range(256)) * 9
    assert [chunking.chunk_at(data, i, 500) for i in range(5)] == list(chunking.split(data, 500))
    with pytest.raises(IndexError):
        chunking.chunk_at(data, 5, 500)


def test_verify_only_assembly_checks_every_chunk_and_keeps_no_bytes() -> None:
    data = bytes(range(256)) * 40
    hashes = chunking.chunk_hashes(data, 1024)
    asm = chunking.Assembler(len(data), 1024, hashes, keep=False)
    chunks = list(chunking.split(data, 1024))
    forged = chunks[1].encode()[:-1] + b"\x00"
    with pytest.raises(VerificationError):
        asm.add(chunking.decode(forged))
    for c in chunks:
        assert asm.add(c)
    assert asm.complete and asm.data() == b""
    with pytest.raises(ValueError):
        chunking.Assembler(len(data), 1024, None, keep=False)  # nothing to verify against


def test_a_decoded_chunk_is_hashed_once_and_its_digest_does_not_outlive_its_bytes() -> None:
    """decode() keeps the SHA-256 it computed for the Assembler; a copy with other bytes
    (dataclasses.replace) does not carry it, so the Assembler hashes that copy itself."""
    import dataclasses

    data = bytes(range(256)) * 8
    hashes = chunking.chunk_hashes(data, 512)
    real = chunking.decode(next(chunking.split(data, 512)).encode())
    assert real.sha256 is not None and real.sha256.hex() == hashes[0]
    forged = dataclasses.replace(real, data=bytes(512))
    assert forged.sha256 is None
    asm = chunking.Assembler(len(data), 512, hashes, keep=False)
    with pytest.raises(VerificationError):
        asm.add(forged)
    assert asm.add(real)
