"""``D.npz``: the rows that calibrate, evaluate and self-test any ONNX model.

One array per model input, keyed by the input's name, rows first; and
optionally ``labels`` (int class per row: the model is a classifier scored by
top-1 accuracy of its first output) or ``reference`` (the expected first
output per row, e.g. embeddings, scored by mean cosine similarity; R² when
each row is one number). It is
checked against the model's own signature before anything runs, so a wrong
file is one clear error rather than a stack trace from deep inside ONNX Runtime.

NOTE: torch-free; numpy and the manifest's ``TensorSpec`` only.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InvalidInputError
from common.inference import V2_TO_NUMPY
from common.manifest import TensorSpec

LABELS = "labels"
REFERENCE = "reference"


@dataclass(frozen=True)
class ModelData:
    inputs: dict[str, np.ndarray]  # input name -> [N, ...] in the model's dtype
    labels: np.ndarray | None = None  # [N] integer classes
    reference: np.ndarray | None = None  # [N, ...] expected first output

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of every input (for golden self-test data)."""
        return {k: np.ascontiguousarray(v[:n]) for k, v in self.inputs.items()}


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InvalidInputError(f"{path}: expected an .npz archive of named arrays")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"cannot read data file {path}: {exc}") from exc


def _check_input(path: Path, spec: TensorSpec, x: np.ndarray) -> None:
    want = V2_TO_NUMPY.get(spec.datatype)
    if x.dtype != want:
        raise InvalidInputError(
            f"{path}: input {spec.name!r} is {x.dtype}, but the model takes {spec.datatype} "
            f"({want})"
        )
    fixed = [(i, d) for i, d in enumerate(spec.shape) if d != -1]
    if x.ndim != len(spec.shape) or any(x.shape[i] != d for i, d in fixed if i > 0):
        shape = [d if d != -1 else "N" for d in spec.shape]
        raise InvalidInputError(
            f"{path}: input {spec.name!r} has shape {list(x.shape)}, the model takes {shape}"
        )


def load_model_data(path: Path, inputs: list[TensorSpec]) -> ModelData:
    """Read ``path`` and check it against the model's input signature."""
    arrays = _read(Path(path))
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidInputError(
            f"{path}: no array for model input(s) {missing} (it has {sorted(arrays)})"
        )
    unknown = sorted(set(arrays) - {*names, LABELS, REFERENCE})
    if unknown:
        raise InvalidInputError(
            f"{path}: arrays {unknown} are neither model inputs {names} "
            f"nor {LABELS!r}/{REFERENCE!r}"
        )
    if LABELS in arrays and REFERENCE in arrays:
        raise InvalidInputError(f"{path}: give {LABELS!r} or {REFERENCE!r}, not both")
    for spec in inputs:
        _check_input(Path(path), spec, arrays[spec.name])
    rows = {k: (len(v) if v.ndim else 0) for k, v in arrays.items()}
    if len(set(rows.values())) != 1:
        raise InvalidInputError(f"{path}: arrays have different numbers of rows: {rows}")
    if not next(iter(rows.values())):
        raise InvalidInputError(f"{path}: no rows (an empty calibration set)")
    labels = arrays.get(LABELS)
    if labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        raise InvalidInputError(
            f"{path}: {LABELS!r} must be integers [N], got {labels.dtype} {list(labels.shape)}"
        )
    batch = fixed_batch(inputs)
    if batch is not None and next(iter(rows.values())) % batch:
        raise InvalidInputError(
            f"{path}: the model takes batches of {batch}; give a multiple of {batch} rows"
        )
    return ModelData({n: arrays[n] for n in names}, labels, arrays.get(REFERENCE))


def fixed_batch(inputs: list[TensorSpec]) -> int | None:
    """The batch size a model insists on (a fixed first dimension), or None if dynamic."""
    fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] != -1}
    return min(fixed) if fixed else None


def save_model_data(
    path: Path,
    inputs: dict[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> Path:
    """Write a ``D.npz`` atomically: it appears complete or not at all."""
    path = Path(path)
    arrays = dict(inputs)
    if labels is not None:
        arrays[LABELS] = labels
    if reference is not None:
        arrays[REFERENCE] = reference
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
