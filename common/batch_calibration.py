"""The short measurement at load that picks a model's preferred batch size on this host.

Throughput (rows/s) is measured at batch 1, 2, 4, ... up to the max batch;
the preferred size is the smallest whose throughput is within 10% of the
best seen, i.e. the size after which throughput stops rising. Two sizes in a
row that do not beat the best by 3% end the measurement early (a slow model's
largest batches cost seconds each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.inference import Tensor

PLATEAU = 0.9  # a size within this fraction of the best throughput counts as the plateau
GAIN = 1.03  # a larger size must beat the best rate by this factor to count as rising


class _Runs(Protocol):
    def infer_sync(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None
    ) -> list[Tensor]: ...


@dataclass(frozen=True)
class Calibration:
    preferred: int
    seconds: dict[int, float]  # median compute time of one run, by batch size

    @property
    def best(self) -> int:
        """The size with the highest rate: larger batches only add latency (or lose rate)."""
        return max(self.seconds, key=self.rows_per_s)

    def rows_per_s(self, size: int) -> float:
        return size / self.seconds[size]

    def as_dict(self) -> dict[str, Any]:
        return {
            "preferred_batch": self.preferred,
            "best_batch": self.best,
            "rows_per_s": {str(b): round(self.rows_per_s(b), 1) for b in sorted(self.seconds)},
        }

    def summary(self) -> str:
        return ", ".join(f"b{b}: {self.rows_per_s(b):.0f}/s" for b in sorted(self.seconds))


def batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def tile(example: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``example``'s first row repeated ``rows`` times, per input."""
    return {n: np.ascontiguousarray(np.repeat(a[:1], rows, axis=0)) for n, a in example.items()}


def calibrate(
    runtime: _Runs, example: dict[str, np.ndarray], max_batch: int, budget_s: float
) -> Calibration:
    """Time each batch size for about ``budget_s`` in all (blocking: call it in a thread)."""
    sizes = batch_sizes(max_batch)
    per_size = budget_s / len(sizes)
    seconds: dict[int, float] = {}
    best, flat = 0.0, 0
    for size in sizes:
        feeds = tile(example, size)
        runtime.infer_sync(feeds, None)  # warm-up: first runs allocate
        times: list[float] = []
        end = time.perf_counter() + per_size
        while len(times) < 3 or (time.perf_counter() < end and len(times) < 200):
            start = time.perf_counter()
            runtime.infer_sync(feeds, None)
            times.append(time.perf_counter() - start)
        seconds[size] = float(np.median(times))
        rate = size / seconds[size]
        flat = flat + 1 if rate < GAIN * best else 0
        best = max(best, rate)
        if flat == 2:
            break
    return Calibration(preferred_size(seconds), seconds)


def preferred_size(seconds: dict[int, float]) -> int:
    rates = {b: b / s for b, s in seconds.items()}
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= PLATEAU * best)
