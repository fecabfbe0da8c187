"""Your own model through the pipeline: the ``--factory`` / ``--dataset`` contract.

``fogline model train --factory pkg.module:make_model --dataset pkg.module:make_dataset``
imports two zero-argument callables by name:

- ``make_model() -> torch.nn.Module``. ``forward(*inputs)`` takes one tensor
  per input, in the order of ``TrainingData.train_inputs``, and returns the
  output tensor (or a tuple, one per ``output_names``); that is what is
  exported to ONNX. If the module also has ``logits(*inputs)``, the loss is
  computed on it instead (so ``forward`` may end in a softmax, as the built-in
  digits models do).
- ``make_dataset() -> TrainingData``: named input tensors and targets for the
  train and validation splits, the output names, and optionally the loss.
  Integer targets mean classification (cross-entropy, accuracy reported),
  float targets regression (mean squared error).

Factories are called after the training seed is set, so the same ``--seed``
gives the same initial weights. Anything that goes wrong on the user's side
(a bad spec, an import error, a factory that raises or returns the wrong
thing) is a ``FactoryError`` with one line that says which and why.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from common.errors import FoglineError

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
LOSSES = ("cross_entropy", "mse")
Augment = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class FactoryError(FoglineError, ValueError):
    """A model or dataset factory could not be found, failed, or returned the wrong thing."""


@dataclass(frozen=True)
class TrainingData:
    """What a dataset factory returns: named inputs [N, ...] and targets [N, ...] per split.

    ``augment`` (optional) maps a batch of train inputs to an augmented batch;
    it may draw from torch's global RNG, which checkpoints save and restore.
    """

    train_inputs: dict[str, torch.Tensor]
    train_targets: torch.Tensor
    val_inputs: dict[str, torch.Tensor]
    val_targets: torch.Tensor
    output_names: tuple[str, ...] = ("output",)
    loss: str | None = None  # "cross_entropy" | "mse"; None: from the targets' dtype
    augment: Augment | None = field(default=None, compare=False)
    # More dynamic axes for the ONNX export, beyond the batch axis every tensor
    # gets, e.g. {"input_ids": {1: "sequence"}} for variable-length sequences.
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return list(self.train_inputs)

    @property
    def loss_name(self) -> str:
        if self.loss is not None:
            return self.loss
        return "mse" if self.train_targets.is_floating_point() else "cross_entropy"

    @property
    def is_classification(self) -> bool:
        return self.loss_name == "cross_entropy"


def resolve(spec: str, what: str) -> Callable[[], Any]:
    """Import ``pkg.module:name`` and return the callable it names.

    The current directory is importable, as with ``python -m`` or uvicorn, so
    a user's ``mymodels.py`` beside them works without installing it.
    """
    if not _SPEC.match(spec):
        raise FactoryError(f"{what} {spec!r} is not of the form pkg.module:name")
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs user code: any failure is theirs to see
        raise FactoryError(
            f"{what} {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise FactoryError(f"{what} {spec!r}: module {module_name} has no {attr!r}")
    if not callable(fn):
        raise FactoryError(f"{what} {spec!r}: {attr!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _call(spec: str, what: str) -> Any:
    fn = resolve(spec, what)
    try:
        return fn()
    except Exception as exc:
        raise FactoryError(f"{what} {spec!r} raised {type(exc).__name__}: {exc}") from exc


def make_model(spec: str) -> nn.Module:
    """Call the model factory; refuse anything that is not a ``torch.nn.Module``."""
    model = _call(spec, "model factory")
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def make_dataset(spec: str) -> TrainingData:
    """Call the dataset factory and check what it returned."""
    data = _call(spec, "dataset factory")
    if not isinstance(data, TrainingData):
        raise FactoryError(
            f"dataset factory {spec!r} returned {type(data).__name__}, not "
            "cloud.pipeline.factory.TrainingData"
        )
    check_training_data(data, f"dataset factory {spec!r}")
    return data


def _check_split(inputs: Any, targets: Any, split: str, where: str) -> int:
    if not isinstance(inputs, dict) or not inputs:
        raise FactoryError(f"{where}: {split}_inputs must be a non-empty dict of name -> tensor")
    if not isinstance(targets, torch.Tensor):
        raise FactoryError(f"{where}: {split}_targets must be a torch.Tensor")
    rows = len(targets) if targets.ndim else 0
    if rows == 0:
        raise FactoryError(f"{where}: the {split} split is empty")
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise FactoryError(f"{where}: {split} input {name!r} must be a tensor [N, ...]")
        if len(x) != rows:
            raise FactoryError(
                f"{where}: {split} input {name!r} has {len(x)} rows but there are {rows} targets"
            )
    return rows


def check_training_data(data: TrainingData, where: str) -> None:
    """Same input names in both splits, rows that line up, a known loss, named outputs."""
    _check_split(data.train_inputs, data.train_targets, "train", where)
    _check_split(data.val_inputs, data.val_targets, "val", where)
    if list(data.train_inputs) != list(data.val_inputs):
        raise FactoryError(
            f"{where}: train inputs {list(data.train_inputs)} and val inputs "
            f"{list(data.val_inputs)} differ"
        )
    if data.loss is not None and data.loss not in LOSSES:
        raise FactoryError(f"{where}: unknown loss {data.loss!r}; known: {list(LOSSES)}")
    if not data.output_names or not all(isinstance(n, str) and n for n in data.output_names):
        raise FactoryError(f"{where}: output_names must be non-empty strings")
    unknown = set(data.dynamic_axes) - {*data.train_inputs, *data.output_names}
    if unknown:
        raise FactoryError(f"{where}: dynamic_axes names unknown tensors {sorted(unknown)}")


def with_extra_rows(data: TrainingData, extra: dict[str, Any], source: str) -> TrainingData:
    """``data`` with more training rows (e.g. hard examples from the fleet) appended.

    ``extra`` holds one array per model input and ``labels`` (classification) or
    ``reference`` (regression targets), as a ``D.npz`` does. Validation rows are
    untouched, so the before/after metrics compare like with like.
    """
    import numpy as np

    names = data.input_names
    missing = [n for n in names if n not in extra]
    target_key = "labels" if data.is_classification else "reference"
    if missing or target_key not in extra:
        raise FactoryError(f"{source}: needs arrays {[*names, target_key]}, has {sorted(extra)}")
    columns: dict[str, torch.Tensor] = {}
    for name in names:
        ours = data.train_inputs[name]
        theirs = torch.from_numpy(np.ascontiguousarray(extra[name])).to(ours.dtype)
        if tuple(theirs.shape[1:]) != tuple(ours.shape[1:]):
            raise FactoryError(
                f"{source}: {name!r} rows are {list(theirs.shape[1:])}, "
                f"the training data's {list(ours.shape[1:])}"
            )
        columns[name] = torch.cat([ours, theirs])
    targets = torch.from_numpy(np.ascontiguousarray(extra[target_key])).to(data.train_targets.dtype)
    if len(targets) != len(next(iter(columns.values()))) - len(data.train_targets):
        raise FactoryError(f"{source}: {target_key!r} and the inputs have different row counts")
    return replace(
        data, train_inputs=columns, train_targets=torch.cat([data.train_targets, targets])
    )
