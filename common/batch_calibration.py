"""The short measurement at load that picks a model's preferred batch size on this host.

Throughput (rows/s) is measured at batch 1, 2, 4, ... up to the max batch;
the preferred size is the smallest whose throughput is within 10% of the
best seen, i.e. the size after which throughput stops rising. Two sizes in a
row that do not beat the best by 3% end the measurement early (a slow model's
largest batches cost seconds each). The sizes are timed in interleaved passes,
so a busy phase of a shared host weighs on all of them alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.inference import Tensor

PLATEAU = 0.9  # a size within this fraction of the best throughput counts as the plateau
GAIN = 1.03  # a larger size must beat the best rate by this factor to count as rising
ROUNDS = 3  # interleaved passes over the sizes (at least one run of each size per pass)


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
    """Time each batch size for about ``budget_s`` in all (blocking: call it in a thread).

    The sizes are timed in ``ROUNDS`` interleaved passes and each keeps its median:
    on a shared host a busy phase then slows every size alike instead of making
    whichever size it fell on look slow (one such phase once made a calibration pick
    batch 2 for MiniLM). The first pass also finds where throughput stops rising.
    """
    sizes = batch_sizes(max_batch)
    per_pass = budget_s / len(sizes) / ROUNDS
    samples: dict[int, list[float]] = {}
    feeds: dict[int, dict[str, np.ndarray]] = {}
    best, flat = 0.0, 0
    for size in sizes:
        feeds[size] = tile(example, size)
        runtime.infer_sync(feeds[size], None)  # warm-up: first runs allocate
        samples[size] = _timed_runs(runtime, feeds[size], per_pass)
        rate = size / float(np.median(samples[size]))
        flat = flat + 1 if rate < GAIN * best else 0
        best = max(best, rate)
        if flat == 2:
            break
    for _ in range(ROUNDS - 1):
        for size in samples:
            samples[size] += _timed_runs(runtime, feeds[size], per_pass)
    seconds = {size: float(np.median(times)) for size, times in samples.items()}
    return Calibration(preferred_size(seconds), seconds)


def _timed_runs(runtime: _Runs, feeds: dict[str, np.ndarray], seconds: float) -> list[float]:
    """Durations of runs of ``feeds`` for about ``seconds`` (at least one, at most 70)."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while not times or (time.perf_counter() < end and len(times) < 70):
        start = time.perf_counter()
        runtime.infer_sync(feeds, None)
        times.append(time.perf_counter() - start)
    return times


def preferred_size(seconds: dict[int, float]) -> int:
    rates = {b: b / s for b, s in seconds.items()}
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= PLATEAU * best)
