"""ONNX Runtime speed of several models, measured side by side.

This machine's speed drifts by up to 30% over tens of seconds, so models are
timed in interleaved rounds (A, B, C, A, B, C, …) on one intra-op thread each:
drift hits them alike and only their ratios are read.

NOTE: torch-free.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.onnx_runtime import open_session

Runner = Callable[[dict[str, np.ndarray]], Any]


@dataclass(frozen=True)
class Speed:
    latency_p50_ms_b1: float
    throughput: float  # rows per second at ``batch``
    batch: int


def rows_of(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``n`` rows of every input, repeating the data if it has fewer."""
    have = len(next(iter(feeds.values())))
    index = np.arange(n) % have
    return {k: np.ascontiguousarray(v[index]) for k, v in feeds.items()}


def session_runner(path: Path, threads: int = 1) -> Runner:
    session = open_session(path, threads=threads)
    return lambda feeds: session.run(None, feeds)


def _time(run: Runner, feeds: dict[str, np.ndarray], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        run(feeds)
        out.append(time.perf_counter() - start)
    return out


def measure(
    runners: dict[str, Runner],
    feeds: dict[str, np.ndarray],
    *,
    batch: int = 32,
    rounds: int = 5,
    seconds_per_call_set: float = 0.3,
) -> dict[str, Speed]:
    """Median batch-1 latency and batch-``batch`` throughput of each runner, interleaved.

    Each round gives every runner about ``seconds_per_call_set`` at each batch size
    (at least one call), so slow and fast models get comparable sample counts.
    """
    one, many = rows_of(feeds, 1), rows_of(feeds, batch)
    calls: dict[tuple[str, int], int] = {}
    for name, run in runners.items():  # warm-up, and size each model's call count
        for b, f in ((1, one), (batch, many)):
            t = min(_time(run, f, 2))
            calls[name, b] = max(1, min(200, int(seconds_per_call_set / max(t, 1e-6))))
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for b, f in ((1, one), (batch, many)):
            for name, run in runners.items():
                samples[name, b] += _time(run, f, calls[name, b])
    return {
        name: Speed(
            latency_p50_ms_b1=statistics.median(samples[name, 1]) * 1000.0,
            throughput=batch / statistics.median(samples[name, batch]),
            batch=batch,
        )
        for name in runners
    }
