"""Engine packages for tests: signed, chunked packages whose model file is a stand-in.

TensorRT cannot run here (no GPU, no libraries), so the "engine" is a few bytes that
say what they are (``STAND_IN``). Nothing here ever deserializes one: the registry
stores and chunks it, the control plane picks it, simulated devices verify its
signature and chunks, and real agents refuse it before downloading (no TensorRT).

Plain helper module: ``from tests.engine_fixtures import engine_manifest``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from common.golden import GOLDEN_FILE
from common.manifest import Manifest, Target, file_entry

STAND_IN = b"FOGLINE TEST STAND-IN, NOT A TENSORRT ENGINE\n"


def engine_manifest(
    onnx_dir: Path,
    onnx: Manifest,
    out: Path,
    compute_capability: str,
    tensorrt_version: str,
    **changes: object,
) -> Manifest:
    """Write an engine package for ``onnx``'s version into ``out``; return its manifest
    (unsigned, as an operator uploads it). ``changes`` override manifest fields."""
    out.mkdir(parents=True, exist_ok=True)
    plan = out / "model.plan"
    plan.write_bytes(STAND_IN + f"{compute_capability} {tensorrt_version}\n".encode() * 64)
    shutil.copyfile(onnx_dir / GOLDEN_FILE, out / GOLDEN_FILE)
    manifest = replace(
        onnx,
        format="tensorrt",
        precision="fp16",
        files=[file_entry(plan, "model"), file_entry(out / GOLDEN_FILE, "golden")],
        target=Target("any", "cuda", tensorrt_version, compute_capability),
        chunks=None,
    )
    return replace(manifest, **changes)  # type: ignore[arg-type]
