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
