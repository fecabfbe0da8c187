"""The quality gate every compressed version passes before it can be published.

Classifiers (and regressors, scored by R²) may lose at most ``max_drop_points``
percentage points against their parent; embeddings (scored by mean cosine to
the reference, or to the parent's own outputs) must stay at or above
``min_cosine`` whatever the parent scored. A size budget (a share of the
parent's bytes) is optional; the int8 search holds its candidates to it. A
miss says by how much it missed, so the operator knows whether to loosen the
budget or try another method.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import FoglineError

MEAN_COSINE = "mean_cosine"
DEFAULT_MAX_DROP_POINTS = 1.0
DEFAULT_MIN_COSINE = 0.99


class GateError(FoglineError, ValueError):
    """A compressed model missed its gate; nothing was written.

    ``quality`` is the score that missed (None when the raiser has no single figure).
    """

    def __init__(self, message: str, *, method: str = "", quality: float | None = None) -> None:
        super().__init__(message)
        self.method = method
        self.quality = quality


@dataclass(frozen=True)
class QualityGate:
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS
    min_cosine: float = DEFAULT_MIN_COSINE
    max_size_ratio: float | None = None  # of the parent's bytes; None = any size

    def size_miss(self, size: int, parent_size: int) -> str | None:
        """Why ``size`` bytes is over the size budget, or None if it fits."""
        if self.max_size_ratio is None or size <= self.max_size_ratio * parent_size:
            return None
        return (
            f"size {size / parent_size:.1%} of the parent is over the "
            f"{self.max_size_ratio:.0%} budget"
        )

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
            raise GateError(
                f"{method} model rejected: {why}; nothing written", method=method, quality=quality
            )
