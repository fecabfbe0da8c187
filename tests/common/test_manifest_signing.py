"""Manifest, signatures, artifacts: what an attacker or a bad disk could change is caught."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.errors import InvalidInputError, VerificationError
from common.manifest import (
    MANIFEST_FILE,
    FileEntry,
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


def test_malformed_manifest_documents_are_refused(package) -> None:
    doc = package.signed.to_dict()
    del doc["manifest"]["files"]
    with pytest.raises(InvalidInputError):
        SignedManifest.from_dict(doc)
    with pytest.raises(InvalidInputError):
        SignedManifest.from_dict({"manifest": {"schema": "other"}, "signature": "", "key_id": ""})
