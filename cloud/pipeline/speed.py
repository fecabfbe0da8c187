"""Latency p50 at batch 1 and throughput at batch 32 of an ONNX model, as a version records.

Measured on one ONNX Runtime thread (as an agent runs it) within a small time
budget, so that packaging stays quick; the figures are this machine's and say
so only relative to other versions measured here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cloud.pipeline.routing import _tile
from common.lineage import LATENCY_P50_MS_B1, THROUGHPUT_B32
from common.onnx_runtime import open_session

_MAX_REPEATS = 50


def _timed_runs(session: object, feeds: dict[str, np.ndarray], budget_s: float) -> list[float]:
    run = session.run  # type: ignore[attr-defined]
    run(None, feeds)  # warm-up: first runs allocate
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < _MAX_REPEATS and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run(None, feeds)
        times.append(time.perf_counter() - start)
    return times


def measure_speed(
    model_path: Path, rows: dict[str, np.ndarray], *, budget_s: float = 0.5
) -> dict[str, float]:
    """``{latency_p50_ms_b1, throughput_b32}`` (rows/s) on rows cycled from ``rows``."""
    session = open_session(Path(model_path), threads=1)
    one = _timed_runs(session, _tile(rows, 1), budget_s)
    batch = _timed_runs(session, _tile(rows, 32), budget_s)
    return {
        LATENCY_P50_MS_B1: float(np.median(one)) * 1000.0,
        THROUGHPUT_B32: 32.0 / float(np.median(batch)),
    }
