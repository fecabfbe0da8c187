"""The digits cascade at the shipped threshold: how much is escalated, how much accuracy is lost.

The shipped edge model (``cloud.pipeline.edge_student``: the int8 MLP distilled
from the cloud CNN, as ``fogline demo`` publishes it) answers a held-out row
unless its uncertainty score is over the threshold its package ships with
(calibrated on the validation rows); then the cloud CNN answers. The figures
are the share of test rows escalated and the points of accuracy the hybrid
loses against sending every row to the cloud; and the same at the threshold
calibrated on the validation rows for the ideal gap (``threshold_for_gap``),
for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline.data import Split
from cloud.pipeline.onnx_model import predict
from cloud.pipeline.routing import threshold_for_gap
from common.manifest import RoutingHints
from kernels.uncertainty import score

TARGET_FRACTION, TARGET_GAP_PT = 0.12, 0.3  # issue 8's target
IDEAL_FRACTION, IDEAL_GAP_PT = 0.10, 0.1  # where we want to be


def cascade_figures(
    edge_model: Path, cloud: Path, hints: RoutingHints, split: Split
) -> dict[str, Any]:
    """Escalated share and accuracy gap on the test rows, at the shipped threshold."""
    shipped = _cascade(
        edge_model,
        cloud,
        hints.uncertainty_metric,
        hints.uncertainty_threshold,
        split.x_test,
        split.y_test,
    )
    # The alternative: the threshold calibrated on the validation rows for the ideal gap.
    val_edge = predict(edge_model, split.x_val)
    val_scores = score(hints.uncertainty_metric, val_edge)
    tuned = threshold_for_gap(
        val_scores,
        val_edge.argmax(axis=-1) == split.y_val,
        predict(cloud, split.x_val).argmax(axis=-1) == split.y_val,
        IDEAL_GAP_PT / 100.0,
    )
    alt = _cascade(edge_model, cloud, hints.uncertainty_metric, tuned, split.x_test, split.y_test)
    return {
        **{f"cascade_{k}": v for k, v in shipped.items()},
        **{
            f"cascade_gap_calibrated_{k}": alt[k]
            for k in ("escalated_fraction", "gap_pt", "target_met", "threshold")
        },
    }


def _cascade(
    edge_model: Path, cloud: Path, metric: str, threshold: float, x: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    edge_probs = predict(edge_model, x)
    cloud_pred = predict(cloud, x).argmax(axis=-1)
    escalate = score(metric, edge_probs) > threshold
    hybrid = np.where(escalate, cloud_pred, edge_probs.argmax(axis=-1))
    cloud_acc = float((cloud_pred == y).mean())
    hybrid_acc = float((hybrid == y).mean())
    edge_acc = float((edge_probs.argmax(axis=-1) == y).mean())
    fraction = float(escalate.mean())
    gap_pt = 100.0 * (cloud_acc - hybrid_acc)
    return {
        "escalated_fraction": round(fraction, 4),
        "gap_pt": round(gap_pt, 2),
        "target_met": fraction <= TARGET_FRACTION and gap_pt <= TARGET_GAP_PT,
        "ideal_met": fraction <= IDEAL_FRACTION and gap_pt <= IDEAL_GAP_PT,
        "edge_accuracy": round(edge_acc, 4),
        "cloud_accuracy": round(cloud_acc, 4),
        "hybrid_accuracy": round(hybrid_acc, 4),
        "test_rows": len(y),
        "metric": metric,
        "threshold": round(threshold, 6),
    }
