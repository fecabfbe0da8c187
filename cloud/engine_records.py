"""TensorRT engine packages, several per model version, beside its one ONNX edge package.

An engine package is an ordinary signed, chunked package (``format: tensorrt``,
variant ``edge``) whose manifest target names the compute capability and the
TensorRT version it was built with (``fogline model build-engine`` records both).
The registry keeps one per (compute capability, TensorRT major.minor) under the
id ``common.hardware.engine_package_id`` gives, in ``engine_packages``, and its
files under ``engines/{name}/{version}/{id}/`` of the artifact store. A version
must have its ONNX edge package first: that is what every device that no engine
fits gets, so an engine is never the only way to run a version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cloud.database import Database
from common.errors import AlreadyExistsError, InvalidInputError
from common.hardware import (
    check_compute_capability,
    check_trt_version,
    engine_package_id,
    trt_major_minor,
)
from common.manifest import Manifest
from common.names import safe_join

ENGINE_FORMAT = "tensorrt"


def is_engine(m: Manifest) -> bool:
    return m.format == ENGINE_FORMAT


def engine_path(store_dir: Path, name: str, version: str, package: str) -> Path:
    return safe_join(store_dir / "engines", name, version, package)


def check_engine(m: Manifest) -> str:
    """The package id of a valid engine manifest; InvalidInputError says what is missing."""
    if m.variant != "edge":
        raise InvalidInputError(f"a TensorRT engine package is an edge package, not {m.variant!r}")
    if m.target.accelerator != "cuda":
        raise InvalidInputError("a TensorRT engine package needs target.accelerator 'cuda'")
    check_compute_capability(m.target.compute_capability, "target.compute_capability")
    check_trt_version(m.target.tensorrt_version, "target.tensorrt_version")
    assert m.target.compute_capability and m.target.tensorrt_version  # checked just above
    return engine_package_id(m.target.compute_capability, m.target.tensorrt_version)


def check_beside_onnx(db: Database, m: Manifest, package: str) -> None:
    """The version's ONNX package exists with the same release and tensors; no twin engine.

    NOTE: the same release, or an agent's release counter would tell an engine and its
    ONNX package apart as an upgrade or a downgrade of each other.
    """
    rows = db.execute(
        "SELECT signed_manifest FROM versions WHERE name=? AND variant='edge' AND version=?",
        (m.name, m.version),
    )
    if not rows:
        raise InvalidInputError(
            f"publish the ONNX edge package of {m.name} {m.version} before its engines"
        )
    onnx = Manifest.from_dict(json.loads(rows[0][0])["manifest"])
    if (onnx.release, onnx.inputs, onnx.outputs) != (m.release, m.inputs, m.outputs):
        raise InvalidInputError(
            f"engine {package} of {m.name} {m.version} must have the ONNX package's "
            "release, inputs and outputs"
        )
    if db.execute(
        "SELECT 1 FROM engine_packages WHERE name=? AND version=? AND package=?",
        (m.name, m.version, package),
    ):
        raise AlreadyExistsError(f"{m.name} {m.version} engine {package} already exists")


def insert_engine(
    db: Database, m: Manifest, package: str, signed_doc: str, digest: str, size: int
) -> None:
    assert m.target.compute_capability and m.target.tensorrt_version  # check_engine ran
    db.execute(
        "INSERT INTO engine_packages (name, version, package, compute_capability,"
        " tensorrt_version, signed_manifest, artifact_digest, artifact_size, created_at)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        (
            m.name,
            m.version,
            package,
            m.target.compute_capability,
            trt_major_minor(m.target.tensorrt_version),
            signed_doc,
            digest,
            size,
            time.time(),
        ),
    )


def engine_rows(db: Database, where: str, args: tuple) -> list[tuple[str, str, str, int]]:
    """(package id, signed manifest JSON, artifact digest, size) of matching engines."""
    rows = db.execute(
        "SELECT package, signed_manifest, artifact_digest, artifact_size FROM engine_packages"
        f" WHERE {where} ORDER BY package",
        args,
    )
    return [(r[0], r[1], r[2], int(r[3])) for r in rows]
