"""The digits cascade at the shipped threshold: how much is escalated, how much accuracy is lost.

The edge int8 MLP answers a held-out row unless its uncertainty score is over
the threshold its package ships with (calibrated on the validation rows, as
``fogline demo`` does it); then the cloud CNN answers. Both models are the
pipeline's own, trained here on the same split. The figures are the share of
test rows escalated and the points of accuracy the hybrid loses against
sending every row to the cloud.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline.data import Split
from cloud.pipeline.export import export_onnx
from cloud.pipeline.onnx_model import predict
from cloud.pipeline.train import train_model
from common.manifest import RoutingHints
from kernels.uncertainty import score

TARGET_FRACTION, TARGET_GAP_PT = 0.12, 0.3  # issue 8's target
IDEAL_FRACTION, IDEAL_GAP_PT = 0.10, 0.1  # where we want to be


def cascade_figures(
    edge_model: Path, hints: RoutingHints, split: Split, workdir: Path, *, seed: int = 0
) -> dict[str, Any]:
    """Escalated share and accuracy gap on the test rows; the cloud CNN is trained here."""
    cloud = export_onnx(train_model("cloud", split, seed=seed), workdir / "cloud-fp32.onnx")
    edge_probs = predict(edge_model, split.x_test)
    cloud_pred = predict(cloud, split.x_test).argmax(axis=-1)
    escalate = score(hints.uncertainty_metric, edge_probs) > hints.uncertainty_threshold
    hybrid = np.where(escalate, cloud_pred, edge_probs.argmax(axis=-1))
    y = split.y_test
    cloud_acc = float((cloud_pred == y).mean())
    hybrid_acc = float((hybrid == y).mean())
    edge_acc = float((edge_probs.argmax(axis=-1) == y).mean())
    fraction = float(escalate.mean())
    gap_pt = 100.0 * (cloud_acc - hybrid_acc)
    return {
        "cascade_escalated_fraction": round(fraction, 4),
        "cascade_gap_pt": round(gap_pt, 2),
        "cascade_target_met": fraction <= TARGET_FRACTION and gap_pt <= TARGET_GAP_PT,
        "cascade_ideal_met": fraction <= IDEAL_FRACTION and gap_pt <= IDEAL_GAP_PT,
        "cascade_edge_accuracy": round(edge_acc, 4),
        "cascade_cloud_accuracy": round(cloud_acc, 4),
        "cascade_hybrid_accuracy": round(hybrid_acc, 4),
        "cascade_test_rows": len(y),
        "cascade_metric": hints.uncertainty_metric,
        "cascade_threshold": round(hints.uncertainty_threshold, 6),
    }
