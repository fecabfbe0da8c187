"""Uncertainty scores of a classifier's output, one per row; higher = less sure.

All take probabilities of shape [N, C] (rows summing to 1) and return [N]
float64 scores in [0, 1] (entropy is normalised by log C), so one threshold
scale fits every metric.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def max_prob(probs: np.ndarray) -> np.ndarray:
    """1 - the top probability."""
    return 1.0 - probs.max(axis=-1).astype(np.float64)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (top probability - second probability)."""
    top2 = np.sort(probs, axis=-1)[..., -2:]
    return 1.0 - (top2[..., 1] - top2[..., 0]).astype(np.float64)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log(C)."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    c = probs.shape[-1]
    return -(p * np.log(p)).sum(axis=-1) / np.log(c) if c > 1 else np.zeros(p.shape[:-1])


# Routing hint for a model whose outputs are not class probabilities (a regressor, an
# embedding): nothing to score, so never escalate on uncertainty.
NO_METRIC = "none"

METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_prob": max_prob,
    "margin": margin,
    "entropy": entropy,
}


def score(metric: str, probs: np.ndarray) -> np.ndarray:
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(
            f"unknown uncertainty metric {metric!r}; known: {sorted(METRICS)}"
        ) from None
    return fn(probs)


def threshold_for_fraction(scores: np.ndarray, fraction: float) -> float:
    """The threshold above which ``fraction`` of these scores lie (for calibration)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be in [0, 1]")
    return float(np.quantile(scores, 1.0 - fraction))
