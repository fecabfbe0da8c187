"""Routing hints for any model, calibrated on the operator's rows.

Two hints: the uncertainty threshold (only a classifier's probabilities have a
meaningful one: it is set to escalate the asked share of the rows), and the
largest batch served locally, taken from latency measured here: the largest
power-of-two batch whose median run stays within the latency budget. The
choice itself is a pure function of the measurements (``largest_within``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from cloud.pipeline.model_data import ModelData, fixed_batch
from common.errors import InvalidInputError
from common.manifest import RoutingHints, TensorSpec
from common.onnx_runtime import open_session
from kernels.uncertainty import NO_METRIC, score, threshold_for_fraction

logger = logging.getLogger(__name__)

BATCHES = tuple(2**i for i in range(11))  # 1 .. 1024
_REPEATS = 5


def looks_like_probabilities(out: np.ndarray) -> bool:
    """Rows of [N, C >= 2] non-negative floats that sum to 1: a classifier's softmax."""
    if out.ndim != 2 or out.shape[1] < 2 or out.dtype.kind != "f" or not len(out):
        return False
    return bool((out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def largest_within(latency_ms: dict[int, float], budget_ms: float) -> int:
    """The largest measured batch whose latency is within budget, and none smaller is over it.

    Stopping at the first batch over budget keeps the answer honest when a
    noisy larger measurement happens to dip back under.
    """
    best = 1
    for batch in sorted(latency_ms):
        if latency_ms[batch] > budget_ms:
            break
        best = batch
    return best


def _tile(inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``rows`` rows made by cycling through the given ones."""
    index = np.arange(rows)
    return {k: np.ascontiguousarray(np.take(v, index % len(v), axis=0)) for k, v in inputs.items()}


def measure_latency_ms(
    model_path: Path, inputs: dict[str, np.ndarray], *, budget_ms: float
) -> dict[int, float]:
    """Median ``session.run`` time per batch size, one thread (as an agent runs it).

    Stops after the first batch over ``budget_ms``: larger ones cannot be chosen.
    """
    session = open_session(model_path, threads=1)
    result: dict[int, float] = {}
    for batch in BATCHES:
        feeds = _tile(inputs, batch)
        session.run(None, feeds)  # warm-up: first runs allocate
        times = []
        for _ in range(_REPEATS):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - start) * 1000.0)
        result[batch] = float(np.median(times))
        if result[batch] > budget_ms:
            break
    return result


def calibrate_for_data(
    model_path: Path,
    specs: list[TensorSpec],
    data: ModelData,
    first_output: np.ndarray,
    *,
    metric: str = "max_prob",
    escalate_fraction: float = 0.15,
    max_local_batch: int | None = None,
    latency_budget_ms: float = 10.0,
) -> RoutingHints:
    """Hints for ``model_path`` from its outputs on ``data`` and its measured latency."""
    if not 0.0 <= escalate_fraction <= 1.0:
        raise InvalidInputError(f"escalate_fraction must be in [0, 1], got {escalate_fraction}")
    threshold = 1.0  # scores are in [0, 1]: never escalate on uncertainty
    if looks_like_probabilities(first_output):
        try:
            threshold = threshold_for_fraction(score(metric, first_output), escalate_fraction)
        except ValueError as exc:  # unknown metric
            raise InvalidInputError(str(exc)) from exc
    else:
        logger.warning("first output is not class probabilities: no uncertainty escalation")
        metric = NO_METRIC
    if max_local_batch is None:
        max_local_batch = fixed_batch(specs)
    if max_local_batch is None:
        latency = measure_latency_ms(model_path, data.inputs, budget_ms=latency_budget_ms)
        max_local_batch = largest_within(latency, latency_budget_ms)
        logger.info("latency p50 by batch (ms): %s -> max local batch %d", latency, max_local_batch)
    if max_local_batch < 1:
        raise InvalidInputError(f"max_local_batch must be at least 1, got {max_local_batch}")
    return RoutingHints(
        uncertainty_metric=metric,
        uncertainty_threshold=threshold,
        max_local_batch=max_local_batch,
    )


def threshold_for_gap(
    scores: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, max_gap: float
) -> float:
    """The highest threshold (fewest rows escalated) whose cascade on these rows is within
    ``max_gap`` (a fraction, 0.001 = 0.1 point) of sending every row to the cloud.

    Rows whose score is over the threshold are escalated. Only cut points between
    distinct scores are considered, so tied rows are escalated together.
    """
    scores = np.asarray(scores, dtype=np.float64)
    edge_ok = np.asarray(edge_correct, dtype=np.float64)
    cloud_ok = np.asarray(cloud_correct, dtype=np.float64)
    if not (len(scores) == len(edge_ok) == len(cloud_ok) > 0) or max_gap < 0:
        raise InvalidInputError("need as many scores as correctness flags, and max_gap >= 0")
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    gain = np.concatenate([[0.0], np.cumsum(cloud_ok[order] - edge_ok[order])])
    need = (cloud_ok.sum() - max_gap * len(scores)) - edge_ok.sum()  # gain[k] >= need
    for k in range(len(scores) + 1):  # escalate the k highest scores
        cut = k == len(scores) or k == 0 or ranked[k - 1] > ranked[k]
        if cut and gain[k] >= need - 1e-9:
            return 1.0 if k == 0 else float(ranked[k]) if k < len(scores) else -1.0
    return -1.0  # unreachable: escalating every row meets any gap >= 0
