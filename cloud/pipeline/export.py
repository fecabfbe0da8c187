"""Export a trained model to one self-contained ONNX file.

The ONNX file is what crosses the trust boundary to the edge, so it must be a
single file: an agent refuses ``external_data`` references (see DESIGN, Trust).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
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


def _torch_export(
    model: nn.Module,
    path: Path,
    examples: dict[str, torch.Tensor],
    output_names: Sequence[str],
    extra_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    axes = {name: {0: "batch", **extra_axes.get(name, {})} for name in [*examples, *output_names]}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it is
        # fast, dependency-free and exact for these small graphs (and writes
        # the opset it is asked for).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model,
            tuple(examples.values()),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(examples),
            output_names=list(output_names),
            dynamic_axes=axes,
        )


def _check(path: Path) -> None:
    """Refuse a graph that is invalid or needs files beside it."""
    proto = onnx.load(str(path), load_external_data=False)
    if has_external_data(proto):
        raise ExportError("exported ONNX model refers to external data")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported ONNX model is invalid: {exc}") from exc


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    examples: dict[str, torch.Tensor] | None = None,
    output_names: Sequence[str] = (OUTPUT_NAME,),
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = OPSET,
) -> Path:
    """Write ``model`` as ONNX (opset ``opset``, dynamic batch on all inputs/outputs) and check it.

    ``examples`` maps each input name, in ``forward``'s argument order, to an
    example tensor [1, ...]; the default is the digits model's single input.
    ``dynamic_axes`` adds axes beyond the batch axis (e.g. a sequence axis).
    The file appears at ``path`` only once it has passed the checks.
    """
    if examples is None:
        examples = {INPUT_NAME: torch.zeros(1, N_FEATURES, dtype=torch.float32)}
    model = model.to("cpu").eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            _torch_export(model, tmp, examples, output_names, dynamic_axes or {}, opset)
        except Exception as exc:  # the exporter raises many types for a user's model
            raise ExportError(f"cannot export to ONNX: {type(exc).__name__}: {exc}") from exc
        _check(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported ONNX model to %s (%d bytes)", path, path.stat().st_size)
    return path
