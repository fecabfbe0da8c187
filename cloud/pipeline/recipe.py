"""Training hyper-parameters, apart from the loop so the CLI can read them without torch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from common.errors import InvalidInputError


@dataclass(frozen=True)
class Recipe:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64

    def override(self, **changes: Any) -> Recipe:
        """This recipe with the given fields replaced (``None`` keeps the current value)."""
        recipe = replace(self, **{k: v for k, v in changes.items() if v is not None})
        if recipe.epochs < 1 or recipe.batch_size < 1 or recipe.lr <= 0:
            raise InvalidInputError(
                f"epochs, batch size and learning rate must be positive, got epochs "
                f"{recipe.epochs}, batch size {recipe.batch_size}, lr {recipe.lr}"
            )
        return recipe
