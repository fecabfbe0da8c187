"""Helpers on ONNX model files shared by export, compress, package and bench.

Sessions are opened with ``common.onnx_runtime.open_session``, like everywhere else.

NOTE: imports neither torch nor sklearn, so the CLI and the packager stay
light; onnx and onnxruntime are imported where used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.onnx_runtime import open_session

logger = logging.getLogger(__name__)


def has_external_data(model: Any) -> bool:
    """Whether any tensor of an ``onnx.ModelProto`` lives outside the .onnx file.

    The agent refuses such models: an external-data path is a file read chosen
    by whoever wrote the model (see DESIGN, Trust).
    """
    import onnx

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(a.t for a in node.attribute if a.HasField("t"))
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)


def input_name(model_path: Path) -> str:
    """The name of the model's single input."""
    inputs = open_session(model_path).get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{model_path}: expected one input, found {len(inputs)}")
    return str(inputs[0].name)


def predict(model_path: Path, x: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """The model's first output (probabilities [N, C]) for rows ``x``."""
    session = open_session(model_path)
    name = session.get_inputs()[0].name
    rows = np.ascontiguousarray(x, dtype=np.float32)
    parts = [session.run(None, {name: rows[i : i + batch]})[0] for i in range(0, len(rows), batch)]
    return np.concatenate(parts, axis=0)
