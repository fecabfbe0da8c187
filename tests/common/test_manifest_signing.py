"""Manifest, signatures, artifacts: what an attacker or a bad disk could change is caught."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common import chunking
from common.errors import InvalidInputError, VerificationError
from common.manifest import (
    MANIFEST_FILE,
    ChunkList,
    FileEntry,
    Manifest,
    SignedManifest,
    artifact_bytes,
    read_package,
    split_artifact,
)
from common.signing import Signer, TrustStore
from tests.model_fixtures import make_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg"))


def test_signed_manifest_round_trips_through_json(package) -> None:
    doc = json.loads((package.directory / MANIFEST_FILE).read_text())
    again = SignedManifest.from_dict(doc)
    assert again == package.signed
    again.verify(TrustStore([package.signer.public_key_hex]))


def test_read_package_checks_signature_and_files(package) -> None:
    trust = TrustStore([package.signer.public_key_hex])
    assert read_package(package.directory, trust).manifest.name == "toy"
    with pytest.raises(VerificationError, match="untrusted key"):
        read_package(package.directory, TrustStore([Signer.generate().public_key_hex]))


def test_any_manifest_change_breaks_the_signature(package) -> None:
    trust = TrustStore([package.signer.public_key_hex])
    tampered = dataclasses.replace(package.manifest, release=99)
    forged = SignedManifest(tampered, package.signed.signature, package.signed.key_id)
    with pytest.raises(VerificationError, match="bad signature"):
        forged.verify(trust)


def test_tampered_file_is_caught(tmp_path) -> None:
    pkg = make_package(tmp_path / "p")
    model = pkg.model_path
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="does not match"):
        read_package(pkg.directory)


def test_split_artifact_checks_length_and_digests(package) -> None:
    blob = artifact_bytes(package.directory, package.manifest)
    files = split_artifact(blob, package.manifest)
    assert set(files) == {"model.onnx", "golden.npz"}
    with pytest.raises(VerificationError, match="bytes"):
        split_artifact(blob[:-1], package.manifest)
    flipped = bytearray(blob)
    flipped[10] ^= 1
    with pytest.raises(VerificationError, match="SHA-256"):
        split_artifact(bytes(flipped), package.manifest)


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "manifest.json", ""])
def test_unsafe_file_names_are_refused(package, name: str) -> None:
    bad = dataclasses.replace(package.manifest, files=[FileEntry(name, 1, "0" * 64, "model")])
    with pytest.raises(InvalidInputError):
        bad.validate()


@pytest.mark.parametrize("fmt", ["pytorch", "ONNX", "", "tensorrt/../x"])
def test_a_format_no_agent_serves_is_refused(package, fmt: str) -> None:
    with pytest.raises(InvalidInputError, match="package format"):
        dataclasses.replace(package.manifest, format=fmt).validate()


def test_malformed_manifest_documents_are_refused(package) -> None:
    doc = package.signed.to_dict()
    del doc["manifest"]["files"]
    with pytest.raises(InvalidInputError):
        SignedManifest.from_dict(doc)
    with pytest.raises(InvalidInputError):
        SignedManifest.from_dict({"manifest": {"schema": "other"}, "signature": "", "key_id": ""})


# -- the chunk list --------------------------------------------------------------------


def test_with_chunks_lists_every_chunk_and_is_signed(package) -> None:
    data = artifact_bytes(package.directory, package.manifest)
    m = package.manifest.with_chunks(data, 1024)
    assert m.chunks == ChunkList(1024, chunking.chunk_hashes(data, 1024))
    assert len(m.chunks.sha256) == chunking.chunk_count(len(data), 1024)
    m.check_chunks(data)
    signer = Signer.generate()
    signed = SignedManifest.sign(m, signer)
    again = SignedManifest.from_dict(json.loads(json.dumps(signed.to_dict())))
    assert again == signed
    again.verify(TrustStore([signer.public_key_hex]))
    # The list is under the signature: one changed hash breaks it.
    hashes = [*m.chunks.sha256[:-1], "0" * 64]
    forged = dataclasses.replace(m, chunks=ChunkList(1024, hashes))
    with pytest.raises(VerificationError, match="bad signature"):
        SignedManifest(forged, signed.signature, signed.key_id).verify(
            TrustStore([signer.public_key_hex])
        )


def test_default_chunk_size_follows_the_artifact(package) -> None:
    data = artifact_bytes(package.directory, package.manifest)
    assert package.manifest.with_chunks(data).chunks.size == chunking.chunk_size_for(len(data))


def test_manifest_without_chunk_list_keeps_its_old_signature(package) -> None:
    """Packages signed before chunk lists existed still verify: no ``chunks`` key at all."""
    assert package.manifest.chunks is None
    assert "chunks" not in package.manifest.to_dict()
    doc = json.loads((package.directory / MANIFEST_FILE).read_text())
    SignedManifest.from_dict(doc).verify(TrustStore([package.signer.public_key_hex]))


def test_chunk_list_must_describe_the_artifact(package) -> None:
    data = artifact_bytes(package.directory, package.manifest)
    with pytest.raises(VerificationError):
        package.manifest.with_chunks(data[:-1] + bytes([data[-1] ^ 1]), 1024)  # not these files
    with pytest.raises(VerificationError, match="no chunk list"):
        package.manifest.check_chunks(data)
    m = package.manifest.with_chunks(data, 1024)
    other = dataclasses.replace(
        m, chunks=ChunkList(1024, [m.chunks.sha256[1], *m.chunks.sha256[1:]])
    )
    with pytest.raises(VerificationError, match="does not match"):
        other.check_chunks(data)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ({"size": 1024, "sha256": ["0" * 64]}, "must hold"),  # too few for the artifact
        ({"size": 1024, "sha256": "0" * 64}, "must hold"),
        ({"size": 0, "sha256": []}, "chunk size"),
        ({"size": 2**40, "sha256": []}, "chunk size"),
        ({"size": "1024", "sha256": []}, "chunk size"),
        ({"size": 64, "sha256": []}, "more than"),  # a tiny size: too many chunks to list
        ({"size": 1024, "sha256": ["../x"] * 7}, "chunk sha256"),
        ({"size": 1024}, "malformed"),
        ([1024], "must be an object"),
    ],
)
def test_malformed_chunk_lists_are_refused(package, chunks, message) -> None:
    doc = package.manifest.to_dict()
    if chunks == {"size": 64, "sha256": []}:  # make the artifact look big
        doc["files"][0]["size"] = 64 * (chunking.MAX_SIGNED_CHUNKS + 1)
    with pytest.raises(InvalidInputError, match=message):
        Manifest.from_dict({**doc, "chunks": chunks})


@pytest.mark.parametrize("size", [0, -1, 63, chunking.MAX_CHUNK_SIZE + 1])
def test_with_chunks_refuses_a_bad_size(package, size: int) -> None:
    data = artifact_bytes(package.directory, package.manifest)
    with pytest.raises(InvalidInputError, match="chunk size"):
        package.manifest.with_chunks(data, size)
