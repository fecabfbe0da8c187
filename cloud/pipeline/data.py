"""The demo data set: scikit-learn's 8×8 digits, split once, deterministically.

It ships inside scikit-learn, so training needs no network, and it is small
enough that a real model trains in seconds on a laptop-class CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

N_FEATURES = 64
N_CLASSES = 10
PIXEL_MAX = 16.0  # digits pixels are integers 0..16


@dataclass(frozen=True)
class Split:
    """Train / validation / test rows: x float32 [N, 64] raw pixels, y int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0) -> Split:
    """Stratified 60/20/20 split, the same for the same seed on every machine."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    logger.debug("digits split: %d train, %d val, %d test", len(y_train), len(y_val), len(y_test))
    return Split(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_val=np.ascontiguousarray(x_val),
        y_val=np.ascontiguousarray(y_val),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
    )
