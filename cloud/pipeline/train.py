"""Train the two demo models: a small edge MLP and a more accurate cloud CNN.

Both take raw pixels (0..16) and return probabilities, so the scaling and the
softmax travel inside the exported ONNX graph and no caller can get them
wrong: the model's input is ``input`` FP32 [-1, 64], its output
``probabilities`` FP32 [-1, 10].
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from cloud.pipeline.data import N_CLASSES, N_FEATURES, PIXEL_MAX, Split
from common.errors import InvalidInputError

logger = logging.getLogger(__name__)

ModelKind = Literal["edge", "cloud"]
Progress = Callable[[int, int, float, float], None]

_TRAIN_THREADS = 2


@dataclass(frozen=True)
class _Recipe:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    augment: bool  # random one-pixel shifts: worth ~1 point to the CNN


# Chosen so that both models together train in well under 15 s on two cores,
# and the cloud model is clearly the more accurate one (~99% vs ~97% on test).
_RECIPES: dict[str, _Recipe] = {
    "edge": _Recipe(epochs=60, lr=3e-3, weight_decay=1e-4, batch_size=64, augment=False),
    "cloud": _Recipe(epochs=30, lr=2e-3, weight_decay=1e-4, batch_size=64, augment=True),
}


class DigitsClassifier(nn.Module):
    """Wraps a logits network with the input scaling and the final softmax."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * (1.0 / PIXEL_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def _edge_body() -> nn.Module:
    # NOTE: wide enough that int8 weights, not graph overhead, dominate the
    # file size, so quantization visibly shrinks it; still ~10x smaller than cloud.
    return nn.Sequential(
        nn.Linear(N_FEATURES, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, N_CLASSES),
    )


class _ToImage(nn.Module):
    """Rows of 64 pixels to 1×8×8 images.

    A fixed ``reshape`` exports as one constant-shape Reshape node, where
    ``nn.Unflatten`` exports a Shape/Slice/Concat chain that ONNX tools choke on.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def _cloud_body() -> nn.Module:
    return nn.Sequential(
        _ToImage(),
        nn.Conv2d(1, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(128, N_CLASSES),
    )


def build_model(kind: ModelKind) -> DigitsClassifier:
    """An untrained model of the given kind (uses the current torch RNG)."""
    if kind == "edge":
        return DigitsClassifier(_edge_body())
    if kind == "cloud":
        return DigitsClassifier(_cloud_body())
    raise InvalidInputError(f"unknown model kind {kind!r}; expected 'edge' or 'cloud'")


@contextmanager
def _training_context(seed: int) -> Iterator[None]:
    """Seed and thread count for one run, restored afterwards: no global side effects."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(_TRAIN_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def accuracy(model: DigitsClassifier, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1] of a torch model (the ONNX one is in compress)."""
    model.eval()
    with torch.no_grad():
        pred = model.logits(torch.from_numpy(x)).argmax(dim=-1).numpy()
    return float((pred == y).mean())


def random_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift each 8×8 image by -1, 0 or +1 pixel on each axis (zero fill)."""
    images = x.view(-1, 1, 8, 8)
    padded = nn.functional.pad(images, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (len(x),))
    dx = torch.randint(0, 3, (len(x),))
    out = torch.empty_like(images)
    for i in range(3):
        for j in range(3):
            rows = (dy == i) & (dx == j)
            out[rows] = padded[rows][:, :, i : i + 8, j : j + 8]
    return out.view(-1, N_FEATURES)


def _run_epoch(
    model: DigitsClassifier,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: _Recipe,
) -> float:
    """One pass over shuffled minibatches; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(y))
    total = 0.0
    for start in range(0, len(y), recipe.batch_size):
        idx = order[start : start + recipe.batch_size]
        xb = x[idx]
        if recipe.augment:
            # Half the rows stay unshifted so the model still sees centred digits.
            xb = torch.where(torch.rand(len(idx), 1) < 0.5, random_shift(xb), xb)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model.logits(xb), y[idx])
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


def train_model(
    kind: ModelKind,
    split: Split,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> nn.Module:
    """Train a model of ``kind`` on ``split``; the same seed gives the same weights."""
    if kind not in _RECIPES:
        raise InvalidInputError(f"unknown model kind {kind!r}; expected 'edge' or 'cloud'")
    recipe = _RECIPES[kind]
    n_epochs = recipe.epochs if epochs is None else epochs
    if n_epochs < 1:
        raise InvalidInputError(f"epochs must be at least 1, got {n_epochs}")
    with _training_context(seed):
        model = build_model(kind)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epochs)
        x = torch.from_numpy(split.x_train)
        y = torch.from_numpy(split.y_train)
        for epoch in range(1, n_epochs + 1):
            loss = _run_epoch(model, optimizer, x, y, recipe)
            scheduler.step()
            val_acc = accuracy(model, split.x_val, split.y_val)
            if progress is not None:
                progress(epoch, n_epochs, loss, val_acc)
    model.eval()
    logger.info("trained %s model: %d epochs, val accuracy %.4f", kind, n_epochs, val_acc)
    return model


def default_progress(width: int = 30) -> Progress:
    """A one-line progress bar on stderr, redrawn in place with ``\\r``.

    When stderr is not a terminal (CI, a log file) it writes a plain line every
    tenth of the run instead, so logs do not fill with carriage returns.
    """
    interactive = sys.stderr.isatty()

    def show(epoch: int, epochs: int, loss: float, val_acc: float) -> None:
        done = round(width * epoch / epochs)
        bar = "#" * done + "." * (width - done)
        line = f"[{bar}] epoch {epoch}/{epochs}  loss {loss:.4f}  val {val_acc * 100:.1f}%"
        if interactive:
            # Padding wipes what a longer previous line left behind.
            sys.stderr.write("\r" + line.ljust(width + 48))
            if epoch == epochs:
                sys.stderr.write("\n")
        elif epoch == epochs or epoch % max(1, epochs // 10) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show
