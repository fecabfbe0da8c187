"""A user's side of ``fogline model train --factory/--dataset``, for the tests.

A tiny classifier with two named inputs (``a`` [N, 4], ``b`` [N, 3]) and one
output ``score`` (probabilities over 3 classes), a synthetic dataset it can
learn, and factories that go wrong in the ways users' do. Imported by name
(``tests.cloud.factory_models:make_model``), also in child processes.
"""

from __future__ import annotations

import torch
from torch import nn

from cloud.pipeline.factory import TrainingData


class TwoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(3, 16)
        self.head = nn.Linear(16, 3)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(a) + self.b(b)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(a, b), dim=-1)


def make_model() -> nn.Module:
    return TwoInput()


def _rows(n: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    a = torch.randn(n, 4, generator=generator)
    b = torch.randn(n, 3, generator=generator)
    s = a[:, 0] + a[:, 1] - b[:, 0]
    y = (s > 0.6).long() + (s > -0.6).long()  # three bands of a linear score
    return {"a": a, "b": b}, y


def make_dataset() -> TrainingData:
    g = torch.Generator().manual_seed(7)  # the data does not depend on --seed
    train_x, train_y = _rows(1024, g)
    val_x, val_y = _rows(300, g)
    return TrainingData(train_x, train_y, val_x, val_y, output_names=("score",))


def raising_model() -> nn.Module:
    raise RuntimeError("weights file not found")


def not_a_module() -> object:
    return {"weights": [1, 2, 3]}


def not_training_data() -> object:
    return {"train": []}


def empty_dataset() -> TrainingData:
    data = make_dataset()
    return TrainingData(
        {k: v[:0] for k, v in data.train_inputs.items()},
        data.train_targets[:0],
        data.val_inputs,
        data.val_targets,
    )


def wrong_width_model() -> nn.Module:
    """Expects ``a`` with 5 features: the dataset gives 4."""
    model = TwoInput()
    model.a = nn.Linear(5, 16)
    return model


class MeanOfSequence(nn.Module):
    """A regression over variable-length sequences: mean over time, then linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens.mean(dim=1))


def make_sequence_model() -> nn.Module:
    return MeanOfSequence()


def make_sequence_dataset() -> TrainingData:
    """Float targets (regression), a sequence axis that the export keeps dynamic."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, 2, generator=g)
    y = x.mean(dim=1) @ torch.tensor([[2.0], [-1.0]]) + 0.5
    return TrainingData(
        {"tokens": x[:300]},
        y[:300],
        {"tokens": x[300:]},
        y[300:],
        output_names=("value",),
        dynamic_axes={"tokens": {1: "sequence"}},
    )
