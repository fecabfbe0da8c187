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

from common.errors import InvalidInputError
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


def check_loads(model_path: Path) -> None:
    """Raise InvalidInputError unless ONNX Runtime can open ``model_path``.

    Checked before any work, so a corrupt or foreign file is one clear line
    and nothing is written.
    """
    try:
        open_session(model_path)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInputError(f"cannot load ONNX model {model_path}: {first_line}") from exc


def run_outputs(
    model_path: Path, feeds: dict[str, np.ndarray], *, batch: int = 256
) -> dict[str, np.ndarray]:
    """Every output of the model for the rows in ``feeds``, run ``batch`` rows at a time."""
    session = open_session(model_path)
    names = [o.name for o in session.get_outputs()]
    rows = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, rows, batch):
        chunk = {k: np.ascontiguousarray(v[start : start + batch]) for k, v in feeds.items()}
        for name, out in zip(names, session.run(names, chunk), strict=True):
            parts[name].append(np.asarray(out))
    return {n: np.concatenate(p, axis=0) for n, p in parts.items()}
