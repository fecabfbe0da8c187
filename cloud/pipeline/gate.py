"""The quality gate every compressed version passes before it can be published.

Classifiers (and regressors, scored by R²) may lose at most ``max_drop_points``
percentage points against their parent; embeddings (scored by mean cosine to
the reference, or to the parent's own outputs) must stay at or above
``min_cosine`` whatever the parent scored. A miss says by how much it missed,
so the operator knows whether to loosen the budget or try another method.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import FoglineError

MEAN_COSINE = "mean_cosine"
DEFAULT_MAX_DROP_POINTS = 1.0
DEFAULT_MIN_COSINE = 0.99


class GateError(FoglineError, ValueError):
    """A compressed model missed its gate; nothing was written."""


@dataclass(frozen=True)
class QualityGate:
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS
    min_cosine: float = DEFAULT_MIN_COSINE

    def miss(self, metric: str, parent_quality: float, quality: float) -> str | None:
        """Why ``quality`` fails the gate (with the margin), or None if it passes."""
        if metric == MEAN_COSINE:
            if quality >= self.min_cosine:
                return None
            return (
                f"mean cosine {quality:.6g} is {self.min_cosine - quality:.2g} below "
                f"the {self.min_cosine:g} floor"
            )
        drop = (parent_quality - quality) * 100.0
        if drop <= self.max_drop_points:
            return None
        return (
            f"{metric} {quality:.2%} vs parent {parent_quality:.2%} is a drop of {drop:.2f} "
            f"points, {drop - self.max_drop_points:.2f} more than the {self.max_drop_points:g} "
            "allowed"
        )

    def check(self, method: str, metric: str, parent_quality: float, quality: float) -> None:
        """Raise ``GateError`` naming ``method`` if it misses."""
        why = self.miss(metric, parent_quality, quality)
        if why is not None:
            raise GateError(f"{method} model rejected: {why}; nothing written")
