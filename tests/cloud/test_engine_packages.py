"""Engine packages beside the ONNX one, and the hardware door, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cloud.database import Database
from cloud.migrations import BASE_SCHEMA
from cloud.pipeline.engine import Gpu, build
from cloud.pipeline.engine_package import package_engine
from cloud.registry import Registry
from common import messages
from common.errors import AlreadyExistsError, InvalidInputError, ModelNotFoundError
from common.manifest import SignedManifest, Target, read_unsigned, split_artifact
from common.signing import Signer, TrustStore
from tests.cloud.test_engine import FakeTensorRT
from tests.engine_fixtures import STAND_IN, engine_manifest
from tests.fogline_cli import fogline
from tests.model_fixtures import make_package, onnx_model_bytes


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "control.sqlite")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def registry(database, tmp_path):
    r = Registry(database, tmp_path / "store", chunk_size=1024)
    yield r
    r.close()


def test_a_version_holds_its_onnx_package_and_one_engine_per_target(registry, tmp_path) -> None:
    signer = Signer.generate()
    pkg = make_package(tmp_path / "onnx", version="1")
    m = pkg.manifest
    # An engine before its version's ONNX package: refused (every device needs a fallback).
    early = engine_manifest(pkg.directory, m, tmp_path / "e0", "8.7", "10.3.0")
    with pytest.raises(InvalidInputError, match=r"ONNX edge package .* before its engines"):
        registry.publish(tmp_path / "e0", early, signer)
    onnx = registry.publish(pkg.directory, m, signer)
    orin = registry.publish(tmp_path / "e0", early, signer)
    ada = engine_manifest(pkg.directory, m, tmp_path / "e1", "8.9", "10.3.1")
    registry.publish(tmp_path / "e1", ada, signer)

    packages = registry.packages("toy", "1")
    assert sorted(packages) == ["onnx", "trt-cc8.7-10.3", "trt-cc8.9-10.3"]
    assert packages["onnx"].artifact_digest == onnx.artifact_digest
    engine = packages["trt-cc8.7-10.3"]
    assert engine.manifest.format == "tensorrt" and engine.manifest.chunks is not None
    engine.signed.verify(TrustStore([signer.public_key_hex]))
    # Signed and chunked as any package: the stored artifact splits into its signed files.
    data = registry.artifact_path(engine.artifact_digest).read_bytes()
    engine.manifest.check_chunks(data)
    assert split_artifact(data, engine.manifest)["model.plan"].startswith(STAND_IN)
    assert registry.version_by_digest(orin.artifact_digest).manifest.format == "tensorrt"
    # The version list and the ONNX lookup are as before: one edge package per version.
    assert [r.manifest.format for r in registry.versions("toy")] == ["onnx"]
    assert registry.version("toy", "1").artifact_digest == onnx.artifact_digest

    # Refused: a twin, another release, another input, no GPU target, no such version.
    with pytest.raises(AlreadyExistsError, match=r"trt-cc8\.7-10\.3 already exists"):
        registry.publish(tmp_path / "e0", early, signer)
    twin = engine_manifest(pkg.directory, m, tmp_path / "e2", "8.7", "10.3.9")
    with pytest.raises(AlreadyExistsError):  # the same major.minor is the same engine key
        registry.publish(tmp_path / "e2", twin, signer)
    bad = [
        (engine_manifest(pkg.directory, m, tmp_path / "b0", "7.2", "8.5.2", release=7), "release"),
        (
            engine_manifest(
                pkg.directory, m, tmp_path / "b1", "7.2", "8.5.2",
                inputs=[replace(m.inputs[0], shape=[-1, 99])],
            ),
            "inputs",
        ),
        (
            engine_manifest(
                pkg.directory, m, tmp_path / "b2", "7.2", "8.5.2", target=Target("any", "cpu")
            ),
            "accelerator",
        ),
        (
            engine_manifest(
                pkg.directory, m, tmp_path / "b3", "7.2", "8.5.2",
                target=Target("any", "cuda", "10.3.0", "../x"),
            ),
            "compute_capability",
        ),
        (engine_manifest(pkg.directory, m, tmp_path / "b4", "7.2", "8.5.2", version="9"), "ONNX"),
    ]  # fmt: skip
    for i, (manifest, error) in enumerate(bad):
        with pytest.raises(InvalidInputError, match=error):
            registry.publish(tmp_path / f"b{i}", manifest, signer)
    assert sorted(registry.packages("toy", "1")) == sorted(packages)  # nothing half-stored
    assert not (tmp_path / "store" / "engines" / "toy" / "1" / "trt-cc7.2-8.5").exists()
    with pytest.raises(ModelNotFoundError):
        registry.packages("toy", "9")


def test_an_engine_signed_offline_is_stored_too(registry, tmp_path) -> None:
    signer = Signer.generate()
    pkg = make_package(tmp_path / "onnx", version="1")
    registry.publish(pkg.directory, pkg.manifest, signer)
    manifest = engine_manifest(pkg.directory, pkg.manifest, tmp_path / "e", "8.7", "10.3.0")
    signed = SignedManifest.sign(registry.with_chunks(tmp_path / "e", manifest), signer)
    record = registry.publish_signed(tmp_path / "e", signed)
    assert registry.packages("toy", "1")["trt-cc8.7-10.3"].signed == record.signed


def _status(hardware: object, **extra: object) -> dict:
    doc = json.loads(messages.status("dev-1", True, models=[{"name": "toy", "version": "1"}]))
    return {**doc, "hardware": hardware, **extra}


@pytest.mark.parametrize(
    "hardware",
    [
        {"arch": "x" * 30_000},
        {"arch": "aarch64", "accelerator": "cuda", "compute_capability": "../x",
         "tensorrt_version": "10.3.0"},
        {"arch": "aarch64", "accelerator": "cuda", "compute_capability": "8.7",
         "tensorrt_version": "10.3.0", "gpu": "A" * 5000},
        "aarch64",
        [1, 2],
    ],
)  # fmt: skip
def test_a_malformed_hardware_report_is_refused_and_the_row_kept(registry, hardware) -> None:
    good = {"arch": "aarch64", "accelerator": "cuda", "compute_capability": "8.7",
            "tensorrt_version": "10.3.0"}  # fmt: skip
    registry.upsert_device("dev-1", _status(good))
    (row,) = registry.devices()
    assert row["hardware"] == good and "hardware_error" not in row
    registry.upsert_device("dev-1", _status(hardware, keyring_version=3))
    (row,) = registry.devices()
    # The rest of the status stands (online, its models, the new keyring version)...
    assert row["state"] == "online" and row["keyring_version"] == 3
    assert row["models"] == [{"name": "toy", "version": "1"}]
    # ...the hardware does not: nothing of it is kept, and why is said (bounded).
    assert row["hardware"] == {} and len(row["hardware_error"]) <= 300
    assert "invalid" in row["hardware_error"] or "object" in row["hardware_error"]
    # A device cannot write the error field itself, and a good report clears it.
    registry.upsert_device("dev-1", _status(good, hardware_error="forged"))
    (row,) = registry.devices()
    assert row["hardware"] == good and "hardware_error" not in row


def test_a_registry_from_before_engines_upgrades_in_place(database, tmp_path) -> None:
    """A rollout row written by the old schema reads as the ONNX package."""
    db = Database(database)
    db.schema(BASE_SCHEMA)
    db.execute("INSERT INTO rollouts VALUES ('r1','toy','1','succeeded',0,1)")
    db.execute("INSERT INTO rollout_devices VALUES ('r1','dev-1','c1','activated',NULL,0)")
    db.close()
    registry = Registry(database, tmp_path / "store")
    try:
        assert registry.rollout("r1")["devices"]["dev-1"]["package"] == "onnx"
        assert registry.rollout_packages("r1") == {"onnx"}
    finally:
        registry.close()


def test_a_built_engine_becomes_a_package_beside_its_onnx_one(registry, tmp_path) -> None:
    """``build-engine`` (against the stand-in tensorrt), ``package-engine``, publish."""
    signer = Signer.generate()
    pkg = make_package(tmp_path / "onnx", version="1")
    registry.publish(pkg.directory, pkg.manifest, signer)
    model = pkg.directory / pkg.manifest.file("model").name
    build(FakeTensorRT(), Gpu("Jetson AGX Orin", "8.7"), model, tmp_path / "eng", "fp16")  # type: ignore[arg-type]

    manifest = package_engine(pkg.directory, tmp_path / "eng", tmp_path / "trt", arch="aarch64")
    assert manifest.format == "tensorrt" and manifest.precision == "fp16"
    assert manifest.target == Target("aarch64", "cuda", "10.3.0", "8.7")
    assert (manifest.release, manifest.inputs) == (pkg.manifest.release, pkg.manifest.inputs)
    record = registry.publish(tmp_path / "trt", read_unsigned(tmp_path / "trt"), signer)
    assert registry.packages("toy", "1")["trt-cc8.7-10.3"] == record

    # An engine built from another model is not this version's engine.
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx_model_bytes(seed=5))
    build(FakeTensorRT(), Gpu("Jetson AGX Orin", "8.7"), other, tmp_path / "eng2", "fp16")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="built from another model"):
        package_engine(pkg.directory, tmp_path / "eng2", tmp_path / "trt2")
    assert not (tmp_path / "trt2").exists()
    # The command line: the same package, and its id on stdout.
    done = fogline(
        "model", "package-engine", "--package", str(pkg.directory),
        "--engine", str(tmp_path / "eng"), "--out", str(tmp_path / "cli"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "engine package trt-cc8.7-10.3" in done.stdout
    assert read_unsigned(tmp_path / "cli").target.compute_capability == "8.7"
