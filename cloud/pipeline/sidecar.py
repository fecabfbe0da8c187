"""``<model>.compression.json``: what a compression step says about the file it wrote.

``fogline model compress``, ``prune`` and ``distill`` write it beside their
output; ``fogline model package`` reads it to fill in the manifest's
``lineage`` (method, params, the parent's model-file SHA-256) and the figures
that the step measured. The fields it uses are checked as strictly as a
manifest's (other keys are ignored, never copied): a sidecar is a file anyone
could have edited.

Shape: ``{"method", "params", "parent_sha256", "metrics": {"quality_metric",
"quality", "parent_quality", "size_bytes", "latency_p50_ms_b1",
"throughput_b32"}}``.

NOTE: torch-free and cheap to import: the ``fogline model`` CLI modules import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidInputError
from common.fsutil import atomic_write
from common.lineage import (
    LATENCY_P50_MS_B1,
    QUALITY_METRICS,
    SIZE_BYTES,
    THROUGHPUT_B32,
    check_method,
    check_params,
    is_finite_number,
)
from common.names import check_digest

SUFFIX = ".compression.json"
MAX_SIDECAR_BYTES = 64 * 1024
_NUMBERS = ("quality", "parent_quality", SIZE_BYTES, LATENCY_P50_MS_B1, THROUGHPUT_B32)
_KEYS = {"method", "params", "parent_sha256", "metrics"}


@dataclass(frozen=True)
class Sidecar:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    parent_sha256: str | None = None
    quality_metric: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the _NUMBERS given

    def evaluation(self) -> dict[str, float]:
        """The figures a manifest's ``evaluation`` takes from this (not quality or size:
        the packager measures those itself on the package's own rows and file)."""
        out = {k: v for k, v in self.metrics.items() if k in (LATENCY_P50_MS_B1, THROUGHPUT_B32)}
        if self.quality_metric and "parent_quality" in self.metrics:
            out[f"parent_{self.quality_metric}"] = self.metrics["parent_quality"]
        return out

    def to_dict(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.quality_metric is not None:
            metrics["quality_metric"] = self.quality_metric
        metrics.update(self.metrics)
        return {
            "method": self.method,
            "params": self.params,
            "parent_sha256": self.parent_sha256,
            "metrics": metrics,
        }


def sidecar_path(model: Path) -> Path:
    """``m.onnx`` -> ``m.onnx.compression.json``."""
    return Path(model).with_name(Path(model).name + SUFFIX)


def _candidates(model: Path) -> list[Path]:
    # NOTE: "m.compression.json" is read too: "<model>.compression.json" reads both ways.
    return [sidecar_path(model), Path(model).with_suffix(SUFFIX)]


def parse_sidecar(doc: object, where: str = "sidecar") -> Sidecar:
    """The known fields, checked; other keys (a tool's own notes) are ignored, never copied."""
    if not isinstance(doc, dict) or "method" not in doc:
        raise InvalidInputError(f"{where}: expected an object with 'method' and {sorted(_KEYS)}")
    metrics = doc.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise InvalidInputError(f"{where}: 'metrics' must be an object")
    figures: dict[str, float] = {}
    for key in _NUMBERS:
        value = metrics.get(key)
        if value is None:
            continue
        if not is_finite_number(value) or value < 0:
            raise InvalidInputError(f"{where}: metric {key!r} must be a finite number >= 0")
        figures[key] = float(value)
    metric = metrics.get("quality_metric")
    if metric is not None and metric not in QUALITY_METRICS:
        raise InvalidInputError(f"{where}: quality_metric must be one of {QUALITY_METRICS}")
    parent_sha = doc.get("parent_sha256")
    if parent_sha is not None:
        check_digest(parent_sha, f"{where} parent_sha256")
    return Sidecar(
        method=check_method(doc["method"]),
        params=check_params(doc.get("params") or {}),
        parent_sha256=parent_sha,
        quality_metric=metric,
        metrics=figures,
    )


def read_sidecar(model: Path) -> Sidecar | None:
    """The sidecar beside ``model``, checked; None if there is none."""
    for path in _candidates(model):
        if not path.is_file():
            continue
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise InvalidInputError(f"{path}: larger than {MAX_SIDECAR_BYTES} bytes")
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read {path}: {exc}") from exc
        return parse_sidecar(doc, str(path))
    return None


def write_sidecar(model: Path, sidecar: Sidecar) -> Path:
    """Write (atomically) the sidecar of ``model``; checked as a reader would check it."""
    doc = sidecar.to_dict()
    parse_sidecar(doc)
    path = sidecar_path(model)
    atomic_write(path, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())
    return path
