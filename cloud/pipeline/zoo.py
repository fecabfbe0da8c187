"""The built-in model zoo: named (model factory, dataset factory, recipe) triples.

A zoo entry is exactly what a user passes with ``--factory`` / ``--dataset``,
plus the recipe its defaults were tuned with, so digits goes through the same
door as anyone's model.

NOTE: torch-free (the CLI lists the zoo); the factories import torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud.pipeline.recipe import Recipe
from common.errors import InvalidInputError


@dataclass(frozen=True)
class ZooEntry:
    model: str  # pkg.module:factory
    dataset: str  # pkg.module:factory
    recipe: Recipe
    description: str


# Chosen so that both digits models together train in well under 15 s on two
# cores, and the cloud model is clearly the more accurate one (~99% vs ~97%).
ZOO: dict[str, ZooEntry] = {
    "digits-edge": ZooEntry(
        "cloud.pipeline.digits:edge_model",
        "cloud.pipeline.digits:dataset",
        Recipe(epochs=60, lr=3e-3, weight_decay=1e-4, batch_size=64),
        "small MLP on 8x8 digits, input 'input' FP32 [-1, 64] (pixels 0..16), "
        "output 'probabilities' FP32 [-1, 10]",
    ),
    "digits-cloud": ZooEntry(
        "cloud.pipeline.digits:cloud_model",
        "cloud.pipeline.digits:augmented_dataset",
        Recipe(epochs=30, lr=2e-3, weight_decay=1e-4, batch_size=64),
        "CNN on 8x8 digits with shift augmentation; same signature as digits-edge",
    ),
}

# ``--kind edge|cloud`` from before the zoo: the same models by their old names.
KIND_ALIASES = {"edge": "digits-edge", "cloud": "digits-cloud"}


def entry(name: str) -> ZooEntry:
    """The zoo entry called ``name`` (or its ``--kind`` alias)."""
    key = KIND_ALIASES.get(name, name)
    try:
        return ZOO[key]
    except KeyError:
        raise InvalidInputError(
            f"unknown model {name!r}; the zoo has {sorted(ZOO)} (aliases {sorted(KIND_ALIASES)})"
        ) from None
