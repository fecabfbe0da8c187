"""Train a model: seed, build (zoo or user factory), run the loop, hand back the result.

``train`` is what ``fogline model train`` runs, for a zoo entry and a user's
``--factory`` alike; ``train_model`` is the short form the demo and the
benchmarks use for the two digits models on a split they already hold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from cloud.pipeline import digits
from cloud.pipeline.data import Split
from cloud.pipeline.distributed import DistContext
from cloud.pipeline.factory import (
    FactoryError,
    TrainingData,
    make_dataset,
    make_model,
    with_extra_rows,
)
from cloud.pipeline.loop import CheckpointPlan, TrainResult, fit
from cloud.pipeline.progress import Progress, default_progress
from cloud.pipeline.recipe import Recipe
from cloud.pipeline.zoo import entry
from common.errors import InvalidInputError

__all__ = ["default_progress", "train", "train_model", "training_context"]

logger = logging.getLogger(__name__)

ModelKind = Literal["edge", "cloud"]

_TRAIN_THREADS = 2


@contextmanager
def training_context(seed: int, threads: int = _TRAIN_THREADS) -> Iterator[None]:
    """Seed and thread count for one run, restored afterwards: no global side effects."""
    before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def train(
    model_spec: str,
    dataset_spec: str,
    recipe: Recipe,
    *,
    seed: int = 0,
    ctx: DistContext | None = None,
    checkpoints: CheckpointPlan | None = None,
    progress: Progress | None = None,
    amp: bool = True,
    extra: list[tuple[str, dict[str, Any]]] | None = None,
) -> tuple[TrainResult, TrainingData]:
    """Build the data and the model from their factories (seeded), then fit.

    Processes of one ``torchrun`` job share the machine's cores, so each gets
    its share of the thread budget rather than all of it.
    """
    ctx = ctx or DistContext()
    threads = max(1, _TRAIN_THREADS // ctx.world_size)
    with training_context(seed, threads):
        data = make_dataset(dataset_spec)
        for source, rows in extra or ():
            data = with_extra_rows(data, rows, source)
        model = make_model(model_spec)
        check_model_fits(model, data, model_spec)
        result = fit(
            model,
            data,
            recipe,
            seed=seed,
            ctx=ctx,
            checkpoints=checkpoints,
            progress=progress,
            amp=amp,
        )
    logger.info("trained %s: %s", model_spec, result.metrics())
    return result, data


def check_model_fits(model: nn.Module, data: TrainingData, spec: str) -> None:
    """Run one val row through the model, so a mismatch is one clear line, not a traceback.

    Runs in eval mode without gradients and draws no random numbers, so the
    seeded run that follows is the same with or without this check.
    """
    row = [v[:1] for v in data.val_inputs.values()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*row)
    except Exception as exc:
        raise FactoryError(
            f"model from {spec!r} cannot take inputs {data.input_names}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        model.train(was_training)
    outputs = len(out) if isinstance(out, tuple | list) else 1
    if outputs != len(data.output_names):
        raise FactoryError(
            f"model from {spec!r} returns {outputs} output(s) but the dataset names "
            f"{len(data.output_names)}: {list(data.output_names)}"
        )


_DIGITS = {"edge": (digits.edge_model, False), "cloud": (digits.cloud_model, True)}


def train_model(
    kind: ModelKind,
    split: Split,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> nn.Module:
    """Train the digits model of ``kind`` on ``split``; the same seed gives the same weights."""
    if kind not in _DIGITS:
        raise InvalidInputError(f"unknown model kind {kind!r}; expected 'edge' or 'cloud'")
    factory, augment = _DIGITS[kind]
    recipe = entry(kind).recipe.override(epochs=epochs)
    with training_context(seed):
        model = factory()
        data = digits.training_data(split, augment=augment)
        result = fit(model, data, recipe, seed=seed, progress=progress)
    logger.info("trained %s model: %s", kind, result.metrics())
    return result.model
