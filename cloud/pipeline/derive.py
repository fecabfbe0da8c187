"""Pruning and distillation jobs: make a new version from a parent, gate it, record how.

Each job writes its ONNX file (dynamic batch) only if the result passes its
gate, with the compression sidecar beside it (``cloud.pipeline.sidecar``) so
that ``fogline model package --parent NAME:VERSION`` records method, params,
the parent's SHA-256 and the figures measured here.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud.pipeline.distill import DistillSettings, distill
from cloud.pipeline.export import export_onnx
from cloud.pipeline.factory import TrainingData, make_dataset, make_model
from cloud.pipeline.loop import fit
from cloud.pipeline.onnx_model import run_outputs
from cloud.pipeline.prune import (
    load_onnx_weights,
    make_permanent,
    parameter_count,
    prune_structured,
    prune_unstructured,
    sparsity,
)
from cloud.pipeline.recipe import Recipe
from cloud.pipeline.sidecar import Sidecar, write_sidecar
from cloud.pipeline.speed import measure_speed
from cloud.pipeline.train import training_context
from common.errors import FoglineError, InvalidInputError
from common.lineage import LATENCY_P50_MS_B1, SIZE_BYTES, THROUGHPUT_B32
from common.manifest import sha256_file

logger = logging.getLogger(__name__)

FINETUNE_LR_SCALE = 0.3  # fine-tuning starts from trained weights: a gentler step


class GateError(FoglineError, ValueError):
    """The derived model lost more quality than allowed; nothing was written."""


@dataclass(frozen=True)
class Spec:
    """What to build and train with: factories (a zoo entry's or the user's) and a recipe."""

    model: str
    dataset: str
    recipe: Recipe
    label: str


@dataclass(frozen=True)
class EvalRows:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    where: str  # "digits test split", "D.npz", ...


def _accuracy(model_path: Path, rows: EvalRows) -> float:
    out = next(iter(run_outputs(model_path, rows.inputs).values()))
    return float((np.asarray(out).argmax(axis=-1) == rows.labels).mean())


def _export(model: nn.Module, data: TrainingData, path: Path) -> Path:
    examples = {k: v[:1].cpu() for k, v in data.val_inputs.items()}
    return export_onnx(
        model,
        path,
        examples=examples,
        output_names=data.output_names,
        dynamic_axes=data.dynamic_axes,
    )


def _check_same_outputs(model: nn.Module, parent: Path, data: TrainingData) -> None:
    """The torch model with the parent's weights answers as the parent file does."""
    rows = {k: v[:16] for k, v in data.val_inputs.items()}
    with torch.no_grad():
        mine = model(*rows.values())
    mine = mine[0] if isinstance(mine, tuple | list) else mine
    theirs = next(iter(run_outputs(parent, {k: v.numpy() for k, v in rows.items()}).values()))
    if not np.allclose(mine.numpy(), theirs, atol=1e-4):
        raise InvalidInputError(f"{parent} does not answer like the architecture loaded with it")


def _gate(what: str, parent_q: float, child_q: float, max_drop: float) -> float:
    drop = (parent_q - child_q) * 100.0
    if drop > max_drop:
        raise GateError(
            f"{what}: accuracy {child_q:.2%} vs parent {parent_q:.2%} is a drop of "
            f"{drop:.2f} points, {drop - max_drop:.2f} more than the {max_drop:g} allowed"
        )
    return drop


def _finish(
    tmp: Path,
    out: Path,
    parent: Path,
    rows: EvalRows,
    method: str,
    params: dict[str, Any],
    max_drop: float,
) -> dict[str, Any]:
    """Gate ``tmp`` against ``parent``; if it passes, move it to ``out`` with its sidecar."""
    parent_q, child_q = _accuracy(parent, rows), _accuracy(tmp, rows)
    drop = _gate(method, parent_q, child_q, max_drop)
    speed_parent = measure_speed(parent, rows.inputs)
    speed = measure_speed(tmp, rows.inputs)
    tmp.replace(out)
    metrics = {
        "quality": child_q,
        "parent_quality": parent_q,
        SIZE_BYTES: float(out.stat().st_size),
        **speed,
    }
    write_sidecar(
        out,
        Sidecar(method, params, sha256_file(parent), "accuracy", metrics),
    )
    return {
        "method": method,
        "params": params,
        "evaluated_on": rows.where,
        "parent_accuracy": parent_q,
        "accuracy": child_q,
        "drop_points": drop,
        "parent_bytes": parent.stat().st_size,
        "bytes": out.stat().st_size,
        "parent_zlib_bytes": len(zlib.compress(parent.read_bytes(), 6)),
        "zlib_bytes": len(zlib.compress(out.read_bytes(), 6)),
        "parent_" + LATENCY_P50_MS_B1: speed_parent[LATENCY_P50_MS_B1],
        LATENCY_P50_MS_B1: speed[LATENCY_P50_MS_B1],
        "parent_" + THROUGHPUT_B32: speed_parent[THROUGHPUT_B32],
        THROUGHPUT_B32: speed[THROUGHPUT_B32],
    }


def prune_job(
    parent: Path,
    spec: Spec,
    rows: EvalRows,
    out: Path,
    *,
    kind: str,
    amount: float,
    finetune_epochs: int,
    seed: int = 0,
    max_drop: float = 1.0,
) -> dict[str, Any]:
    """Prune the parent ONNX model's weights (loaded into ``spec``'s architecture),
    fine-tune, export, gate; see ``cloud.pipeline.prune`` for what each kind buys."""
    if kind not in ("structured", "unstructured"):
        raise InvalidInputError(f"kind must be structured or unstructured, got {kind!r}")
    if finetune_epochs < 0:
        raise InvalidInputError("--finetune-epochs must be at least 0")
    if not 0.0 < amount < 1.0:
        raise InvalidInputError(f"--amount must be between 0 and 1, got {amount}")
    with training_context(seed):
        data = make_dataset(spec.dataset)
        model = load_onnx_weights(make_model(spec.model), parent)
    _check_same_outputs(model, parent, data)
    before = parameter_count(model)
    masks = prune_unstructured(model, amount) if kind == "unstructured" else None
    if kind == "structured":
        prune_structured(model, amount)
    if finetune_epochs:
        recipe = spec.recipe.override(epochs=finetune_epochs, lr=spec.recipe.lr * FINETUNE_LR_SCALE)
        with training_context(seed):
            fit(model, data, recipe, seed=seed)
    if masks is not None:
        make_permanent(masks)
    model.eval()
    tmp = _export(model, data, out.with_name(f".{out.name}.pruning"))
    params: dict[str, Any] = {
        "kind": kind,
        "amount": amount,
        "finetune_epochs": finetune_epochs,
        "parameters": parameter_count(model),
        "parent_parameters": before,
        "sparsity": round(sparsity(model), 4),
        "architecture": spec.label,
    }
    method = f"prune-{kind}-{round(amount * 100)}%"
    try:
        return _finish(tmp, out, parent, rows, method, params, max_drop)
    finally:
        tmp.unlink(missing_ok=True)


def distill_job(
    teacher: Path,
    spec: Spec,
    rows: EvalRows,
    out: Path,
    *,
    settings: DistillSettings,
    epochs: int | None = None,
    seed: int = 0,
    max_drop: float = 1.0,
) -> dict[str, Any]:
    """Train ``spec``'s model from the teacher's soft answers, export, gate against the
    teacher (the parent) on ``rows``."""
    with training_context(seed):
        data = make_dataset(spec.dataset)
    recipe = spec.recipe.override(epochs=epochs)
    result = distill(
        lambda: make_model(spec.model), data, teacher, recipe, settings=settings, seed=seed
    )
    tmp = _export(result.model, data, out.with_name(f".{out.name}.distilling"))
    params: dict[str, Any] = {
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "epochs": recipe.epochs,
        "student": spec.label,
        "parameters": parameter_count(result.model),
    }
    try:
        return _finish(tmp, out, teacher, rows, "distill", params, max_drop)
    finally:
        tmp.unlink(missing_ok=True)
