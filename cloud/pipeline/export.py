"""Export a trained model to one self-contained ONNX file.

The ONNX file is what crosses the trust boundary to the edge, so it must be a
single file: an agent refuses ``external_data`` references (see DESIGN, Trust).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from cloud.pipeline.data import N_FEATURES
from cloud.pipeline.onnx_model import has_external_data
from common.errors import FoglineError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OPSET = 17


class ExportError(FoglineError, RuntimeError):
    """The model could not be exported to a valid, self-contained ONNX file."""


def _torch_export(model: nn.Module, path: Path) -> None:
    example = torch.zeros(1, N_FEATURES, dtype=torch.float32)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it is
        # fast, dependency-free and exact for these small graphs.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _check(path: Path) -> None:
    """Refuse a graph that is invalid or needs files beside it."""
    proto = onnx.load(str(path), load_external_data=False)
    if has_external_data(proto):
        raise ExportError("exported ONNX model refers to external data")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX model is invalid: {exc}") from exc


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Write ``model`` as ONNX (opset 17, dynamic batch) to ``path`` and check it.

    The file appears at ``path`` only once it has passed the checks.
    """
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _torch_export(model, tmp)
        _check(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported ONNX model to %s (%d bytes)", path, path.stat().st_size)
    return path
