"""The built-in digits models: a small edge MLP and a more accurate cloud CNN.

Both take raw pixels (0..16) and return probabilities, so the scaling and the
softmax travel inside the exported ONNX graph and no caller can get them
wrong: the model's input is ``input`` FP32 [-1, 64], its output
``probabilities`` FP32 [-1, 10]. They are ordinary entries of the zoo
(``cloud.pipeline.zoo``): factories and a dataset that follow the same
contract as a user's (``cloud.pipeline.factory``).
"""

from __future__ import annotations

import torch
from torch import nn

from cloud.pipeline.data import N_CLASSES, N_FEATURES, PIXEL_MAX, Split, load_digits_split
from cloud.pipeline.factory import TrainingData

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
DATA_SEED = 0  # the one split every command uses, so test rows are never trained on


class DigitsClassifier(nn.Module):
    """Wraps a logits network with the input scaling and the final softmax."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * (1.0 / PIXEL_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def edge_model() -> DigitsClassifier:
    # NOTE: wide enough that int8 weights, not graph overhead, dominate the
    # file size, so quantization visibly shrinks it; still ~10x smaller than cloud.
    return DigitsClassifier(
        nn.Sequential(
            nn.Linear(N_FEATURES, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, N_CLASSES),
        )
    )


class _ToImage(nn.Module):
    """Rows of 64 pixels to 1×8×8 images.

    A fixed ``reshape`` exports as one constant-shape Reshape node, where
    ``nn.Unflatten`` exports a Shape/Slice/Concat chain that ONNX tools choke on.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def cloud_model() -> DigitsClassifier:
    return DigitsClassifier(
        nn.Sequential(
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
    )


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


def half_shifted(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shift half the rows: the model still sees centred digits (worth ~1 point to the CNN)."""
    x = batch[INPUT_NAME]
    return {INPUT_NAME: torch.where(torch.rand(len(x), 1) < 0.5, random_shift(x), x)}


def training_data(split: Split, *, augment: bool = False) -> TrainingData:
    """A digits split in the factory contract's shape."""
    return TrainingData(
        train_inputs={INPUT_NAME: torch.from_numpy(split.x_train)},
        train_targets=torch.from_numpy(split.y_train),
        val_inputs={INPUT_NAME: torch.from_numpy(split.x_val)},
        val_targets=torch.from_numpy(split.y_val),
        output_names=(OUTPUT_NAME,),
        augment=half_shifted if augment else None,
    )


def dataset() -> TrainingData:
    """The zoo's digits dataset (fixed split), plain."""
    return training_data(load_digits_split(DATA_SEED))


def augmented_dataset() -> TrainingData:
    """The zoo's digits dataset with random one-pixel shifts, for the CNN."""
    return training_data(load_digits_split(DATA_SEED), augment=True)
