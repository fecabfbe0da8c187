"""An engine package: a built TensorRT engine beside the ONNX package it was built from.

``fogline model package-engine --package ONNX_PKG --engine ENGINE_DIR --out DIR``
writes ``DIR/model.plan``, the ONNX package's golden data (and tokenizer, if any)
and ``manifest.unsigned.json``: the ONNX package's name, version, release, tensors
and routing, with ``format: tensorrt``, the engine's precision and a target of
the GPU's compute capability and the TensorRT version (from ``engine.json``).
``fogline model publish DIR`` then stores it beside the version's ONNX package
(``cloud.engine_records``), signed and chunked like any package.

The engine must have been built from this package's model: ``engine.json``'s
model sha256 is checked against the package's model file.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from cloud.pipeline.engine import ENGINE_FILE, read_info
from common.errors import InvalidInputError
from common.hardware import engine_package_id
from common.json_object import parse_json_object
from common.manifest import (
    MANIFEST_FILE,
    UNSIGNED_MANIFEST_FILE,
    Manifest,
    SignedManifest,
    Target,
    file_entry,
    read_unsigned,
    write_unsigned,
)

PLAN_FILE = "model.plan"


def _onnx_manifest(package: Path) -> Manifest:
    """The ONNX package's manifest: unsigned (from ``model package``) or signed."""
    if (package / UNSIGNED_MANIFEST_FILE).is_file():
        return read_unsigned(package)
    try:
        doc = parse_json_object((package / MANIFEST_FILE).read_bytes(), "manifest")
    except OSError as exc:
        raise InvalidInputError(f"{package} holds no package manifest: {exc}") from exc
    return SignedManifest.from_dict(doc).manifest


def package_engine(package: Path, engine_dir: Path, out: Path, *, arch: str = "any") -> Manifest:
    """Write the engine package into ``out`` (which must not exist); return its manifest."""
    onnx = _onnx_manifest(package)
    if onnx.format != "onnx" or onnx.variant != "edge":
        raise InvalidInputError(f"{package} is not an ONNX edge package")
    info = read_info(engine_dir)
    model = onnx.file("model")
    if info.model_sha256 != model.sha256:
        raise InvalidInputError(
            f"the engine in {engine_dir} was built from another model than {package}'s "
            f"{model.name} (sha256 {info.model_sha256[:12]} vs {model.sha256[:12]})"
        )
    target = Target(arch, "cuda", info.tensorrt_version, info.compute_capability)
    engine_package_id(info.compute_capability, info.tensorrt_version)  # checks both
    out.mkdir(parents=True)
    shutil.copyfile(engine_dir / ENGINE_FILE, out / PLAN_FILE)
    files = [file_entry(out / PLAN_FILE, "model")]
    for f in onnx.files:
        if f.role != "model":  # golden data, tokenizer, config: the same as the ONNX one's
            shutil.copyfile(package / f.name, out / f.name)
            files.append(file_entry(out / f.name, f.role))
    manifest = replace(
        onnx, format="tensorrt", precision=info.precision, files=files, target=target,
        chunks=None,
    )  # fmt: skip
    manifest.validate()
    write_unsigned(out, manifest)
    return manifest
