"""How good is a model on a ``D.npz``: one quality figure in [0, 1], named.

- ``labels`` present: top-1 ``accuracy`` of the first output (a classifier).
- ``reference`` present: ``mean_cosine`` of the first output to it (embeddings,
  vectors), or ``r2`` (coefficient of determination) when each row is a single
  number, where a cosine would only compare signs.
- neither: quality is judged relative to a baseline model's outputs (int8 vs
  its own fp32), the same way; the baseline scores 1.0 by definition.

``cloud.pipeline.compressor`` judges every compressed model with these.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cloud.pipeline.model_data import ModelData, fixed_batch
from cloud.pipeline.onnx_model import run_outputs
from common.errors import InvalidInputError
from common.manifest import ACCURACY
from common.onnx_runtime import describe_onnx_io

logger = logging.getLogger(__name__)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity of ``a[i]`` and ``b[i]`` (rows flattened)."""
    if a.shape != b.shape:
        raise InvalidInputError(f"outputs of shape {list(a.shape)} vs reference {list(b.shape)}")
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.where(norms > 0, (x * y).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    return float(cos.mean())


def r2(out: np.ndarray, reference: np.ndarray) -> float:
    """1 - residual / total sum of squares: 1.0 is exact, 0.0 no better than the mean."""
    if out.shape != reference.shape:
        raise InvalidInputError(
            f"outputs of shape {list(out.shape)} vs reference {list(reference.shape)}"
        )
    ref = reference.astype(np.float64)
    total = float(((ref - ref.mean()) ** 2).sum())
    residual = float(((out.astype(np.float64) - ref) ** 2).sum())
    return 1.0 - residual / total if total > 0 else float(residual == 0)


def _closeness(out: np.ndarray, expected: np.ndarray) -> tuple[str, float]:
    if out.size == len(out):  # one number per row
        return "r2", r2(out, expected)
    return "mean_cosine", mean_cosine(out, expected)


def first_output(model_path: Path, data: ModelData) -> np.ndarray:
    """The model's first output for every row of ``data``."""
    inputs, outputs = describe_onnx_io(model_path)
    outs = run_outputs(model_path, data.inputs, batch=fixed_batch(inputs) or 256)
    return outs[outputs[0].name]


def score_outputs(
    out: np.ndarray, data: ModelData, baseline: np.ndarray | None = None
) -> tuple[str, float]:
    """(metric name, quality) of first-output rows ``out`` against ``data``."""
    if data.labels is not None:
        if out.ndim != 2 or out.shape[1] < 2:
            raise InvalidInputError(
                "labels need a classifier output [N, classes]; "
                f"the first output is {list(out.shape)}"
            )
        return ACCURACY, float((out.argmax(axis=-1) == data.labels).mean())
    if data.reference is not None:
        return _closeness(out, data.reference)
    if baseline is None:
        return _closeness(out, out)[0], 1.0
    return _closeness(out, baseline)
