"""Compress an FP32 ONNX model to INT8 and prove it still answers correctly.

Quantization is accepted only with its evidence: accuracy of both models on
the held-out test rows, and their sizes. A model that loses more than the
allowed points is refused with ``AccuracyDropError``, so a bad calibration
never reaches the fleet.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cloud.pipeline.data import Split
from cloud.pipeline.onnx_model import input_name, predict
from cloud.pipeline.quantize import QuantConfig, quantize
from common.errors import FoglineError

logger = logging.getLogger(__name__)

_CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class CompressionReport:
    """FP32 vs INT8 on held-out rows: quality in [0, 1], sizes in bytes.

    Quality is top-1 accuracy unless ``metric`` says otherwise (``mean_cosine``
    to reference outputs, or to the fp32 model's own outputs when the data has
    neither labels nor a reference); the field names stay for old callers.
    """

    fp32_accuracy: float
    int8_accuracy: float
    fp32_bytes: int
    int8_bytes: int
    drop_points: float  # (fp32 - int8) quality in percentage points; negative = gain
    metric: str = "accuracy"

    @property
    def size_ratio(self) -> float:
        return self.fp32_bytes / self.int8_bytes if self.int8_bytes else float("inf")

    def to_dict(self) -> dict[str, float]:
        figures = {k: v for k, v in asdict(self).items() if k != "metric"}
        return {**figures, "size_ratio": self.size_ratio}


class AccuracyDropError(FoglineError, ValueError):
    """INT8 lost more accuracy than allowed; ``report`` has the figures."""

    def __init__(self, report: CompressionReport, max_drop_points: float) -> None:
        self.report = report
        self.max_drop_points = max_drop_points
        super().__init__(
            f"int8 {report.metric} {report.int8_accuracy:.2%} vs fp32 {report.fp32_accuracy:.2%} "
            f"is a drop of {report.drop_points:.2f} points; at most {max_drop_points:g} allowed"
        )


def evaluate(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1] of an ONNX model on rows ``x`` with labels ``y``."""
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as rows (got {len(x)} rows, {len(y)} labels)")
    return float((predict(model_path, x).argmax(axis=-1) == y).mean())


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray | dict[str, np.ndarray],
    *,
    batch: int = _CALIBRATION_BATCH,
    config: QuantConfig | None = None,
) -> Path:
    """INT8 quantization (default: static QDQ, per-channel int8 weights) calibrated on rows.

    ``calibration`` is rows for a single-input model, or one array per input name.
    """
    if isinstance(calibration, np.ndarray):
        name = input_name(Path(fp32_path))
        calibration = {name: np.ascontiguousarray(calibration, dtype=np.float32)}
    return quantize(
        Path(fp32_path), Path(int8_path), config or QuantConfig(), calibration, batch=batch
    )


def compress(
    fp32_path: Path, int8_path: Path, split: Split, *, max_drop_points: float = 1.0
) -> CompressionReport:
    """Quantize (calibrated on train rows), then compare both on the test rows."""
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    quantize_int8(fp32_path, int8_path, split.x_train)
    fp32_acc = evaluate(fp32_path, split.x_test, split.y_test)
    int8_acc = evaluate(int8_path, split.x_test, split.y_test)
    report = CompressionReport(
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        fp32_bytes=fp32_path.stat().st_size,
        int8_bytes=int8_path.stat().st_size,
        drop_points=(fp32_acc - int8_acc) * 100.0,
    )
    logger.info("compression: %s", report)
    if report.drop_points > max_drop_points:
        raise AccuracyDropError(report, max_drop_points)
    return report
