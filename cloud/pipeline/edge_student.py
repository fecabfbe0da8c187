"""The edge digits model that ships: the MLP distilled from the cloud CNN, and its threshold.

``fogline demo`` and ``python -m bench.edge`` both build the edge model here, so
the benchmark measures what the demo rolls out. The student is the zoo's
digits MLP trained against the published cloud model's answers
(``cloud.pipeline.distill``): for the same hybrid accuracy it escalates far
fewer requests than the same MLP trained on the labels alone
(``python -m bench.compression_distill``). Its routing threshold is not a fixed
share of requests but the highest one whose cascade on the validation rows stays
within ``SHIPPED_GAP_PT`` of sending every row to the cloud
(``cloud.pipeline.routing.threshold_for_gap``): a better student escalates less.

Hard examples from the fleet (``hard-examples:MODEL``, rows with the cloud's
answers as labels) join the training rows when given; the validation rows, on
which the threshold is chosen, never change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cloud.pipeline import digits
from cloud.pipeline.data import Split
from cloud.pipeline.distill import distill
from cloud.pipeline.factory import with_extra_rows
from cloud.pipeline.onnx_model import predict
from cloud.pipeline.progress import Progress
from cloud.pipeline.routing import threshold_for_gap
from cloud.pipeline.zoo import entry
from common.manifest import RoutingHints
from kernels.uncertainty import score

# Calibrated on the validation rows for this gap (points); see the module docstring.
SHIPPED_GAP_PT = 0.0
METRIC = "max_prob"
MAX_LOCAL_BATCH = 8  # larger batches are "heavy" and go to the cloud


def train_student(
    split: Split,
    teacher_onnx: Path,
    *,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    source: str = "extra rows",
    progress: Progress | None = None,
) -> nn.Module:
    """The digits MLP distilled from ``teacher_onnx`` on ``split``'s training rows
    (plus ``extra``: inputs and ``labels``, e.g. the fleet's hard examples)."""
    data = digits.training_data(split)
    if extra is not None:
        data = with_extra_rows(data, extra, source)
    recipe = entry("digits-edge").recipe
    return distill(
        digits.edge_model, data, teacher_onnx, recipe, seed=seed, progress=progress
    ).model


def shipped_routing(
    edge_onnx: Path, teacher_onnx: Path, split: Split, *, gap_pt: float = SHIPPED_GAP_PT
) -> RoutingHints:
    """The threshold that keeps the cascade within ``gap_pt`` of the cloud on val rows."""
    edge = predict(edge_onnx, split.x_val)
    cloud_ok = predict(teacher_onnx, split.x_val).argmax(axis=-1) == split.y_val
    threshold = threshold_for_gap(
        score(METRIC, edge), edge.argmax(axis=-1) == split.y_val, cloud_ok, gap_pt / 100.0
    )
    return RoutingHints(
        uncertainty_metric=METRIC,
        uncertainty_threshold=threshold,
        max_local_batch=MAX_LOCAL_BATCH,
    )
