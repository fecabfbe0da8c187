"""The lineage sidecar ``<out>.compression.json``: how a compressed model was made.

``fogline model compress`` writes it beside the model it wrote; the packager
(and the registry's lineage) reads it, so each compressed version records its
parent (by the sha256 of the input ONNX), its method and parameters, and the
figures it was accepted on::

    {"method": "int8-static-qdq" | "int8-dynamic" | "fp16",
     "params": {"per_channel": …, "calibration": …, "nodes_to_exclude": […], …},
     "parent_sha256": "<sha256 of the input ONNX>",
     "metrics": {"quality_metric": "accuracy" | "mean_cosine" | "r2",
                 "quality": float, "parent_quality": float, "size_bytes": int,
                 "latency_p50_ms_b1": float, "throughput_b32": float}}

NOTE: torch-free; the format is shared with the ``lineage`` work, change both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidInputError

SUFFIX = ".compression.json"
METHODS = ("int8-static-qdq", "int8-dynamic", "fp16")


@dataclass(frozen=True)
class CompressionMetrics:
    quality_metric: str
    quality: float
    parent_quality: float
    size_bytes: int
    latency_p50_ms_b1: float
    throughput_b32: float


@dataclass(frozen=True)
class CompressionRecord:
    method: str
    params: dict[str, Any]
    parent_sha256: str
    metrics: CompressionMetrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> CompressionRecord:
        try:
            metrics = CompressionMetrics(**doc["metrics"])
            record = cls(doc["method"], dict(doc["params"]), doc["parent_sha256"], metrics)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"not a compression record: {exc}") from exc
        if record.method not in METHODS:
            raise InvalidInputError(f"unknown compression method {record.method!r}")
        sha = record.parent_sha256
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise InvalidInputError("parent_sha256 must be 64 lowercase hex digits")
        figures = [metrics.quality, metrics.parent_quality, metrics.latency_p50_ms_b1]
        if not all(isinstance(v, float | int) and math.isfinite(v) for v in figures):
            raise InvalidInputError("compression metrics must be finite numbers")
        return record


def record_path(model_path: Path) -> Path:
    """``m8.onnx`` -> ``m8.onnx.compression.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + SUFFIX)


def write_record(model_path: Path, record: CompressionRecord) -> Path:
    """Write the sidecar atomically beside ``model_path``."""
    path = record_path(model_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_record(model_path: Path) -> CompressionRecord | None:
    """The sidecar beside ``model_path``, or None if it has none."""
    path = record_path(model_path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}") from exc
    return CompressionRecord.from_dict(doc)
