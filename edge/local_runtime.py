"""Which runtime serves an installed package: the one place that reads its format."""

from __future__ import annotations

from pathlib import Path

from common.errors import InvalidInputError
from common.hardware import ONNX_PACKAGE, TENSORRT
from common.manifest import Manifest
from common.onnx_runtime import OnnxRuntime
from common.runtime import LocalRuntime
from edge.tensorrt_runtime import TensorRtLibs, TensorRtRuntime


def open_runtime(
    model_file: Path,
    manifest: Manifest,
    *,
    intra_op_threads: int = 1,
    tensorrt: TensorRtLibs | None = None,
) -> LocalRuntime:
    """An unloaded runtime for the package: TensorRT for an engine, else ONNX Runtime.

    ``tensorrt``: the TensorRT and CUDA to use (None: the real ones, imported at load).
    """
    if manifest.format == TENSORRT:
        return TensorRtRuntime(model_file, manifest, libs=tensorrt)
    if manifest.format == ONNX_PACKAGE:
        return OnnxRuntime(model_file, manifest, intra_op_threads=intra_op_threads)
    raise InvalidInputError(f"package format {manifest.format!r} is not served by this agent")
