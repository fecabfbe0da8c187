"""A version's lineage and figures as the registry stores and shows them.

One function reads them out of a manifest (``lineage_columns``), for publish
and for the migration that fills in versions published before lineage
existed; one turns a stored row back into the JSON the API answers
(``lineage_doc``).
"""

from __future__ import annotations

import json
from typing import Any

from common.lineage import (
    LATENCY_P50_MS_B1,
    QUALITY_METRICS,
    THROUGHPUT_B32,
)
from common.manifest import Manifest

LineageColumns = tuple[
    str | None, str | None, str, str | None, float | None, float | None, float | None, int
]


def parent_of(m: Manifest) -> str | None:
    """``name:version`` of the parent: the lineage's, else the old bare ``parent`` version
    (which always named a version of the same model)."""
    if m.lineage is not None:
        return m.lineage.parent
    return f"{m.name}:{m.parent}" if m.parent else None


def quality_of(m: Manifest) -> tuple[str | None, float | None]:
    for metric in QUALITY_METRICS:
        if metric in m.evaluation:
            return metric, float(m.evaluation[metric])
    return None, None


def lineage_columns(m: Manifest) -> LineageColumns:
    """(parent, method, params JSON, quality metric, quality, p50 ms, throughput, size)."""
    metric, quality = quality_of(m)
    latency = m.evaluation.get(LATENCY_P50_MS_B1)
    throughput = m.evaluation.get(THROUGHPUT_B32)
    return (
        parent_of(m),
        m.lineage.method if m.lineage else None,
        json.dumps(m.lineage.params if m.lineage else {}),
        metric,
        quality,
        None if latency is None else float(latency),
        None if throughput is None else float(throughput),
        # NOTE: the model file's size from the signed file list, not a claimed figure.
        m.file("model").size,
    )


def lineage_doc(row: tuple[Any, ...]) -> dict[str, Any]:
    """``{"lineage": ..., "metrics": ...}`` from the stored columns (``lineage_columns`` order)."""
    parent, method, params, metric, quality, latency, throughput, size = row
    return {
        "lineage": {"parent": parent, "method": method, "params": json.loads(params or "{}")},
        "metrics": {
            "quality_metric": metric,
            "quality": quality,
            LATENCY_P50_MS_B1: latency,
            THROUGHPUT_B32: throughput,
            "size_bytes": size,
        },
    }
