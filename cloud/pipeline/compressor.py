"""Make one compressed version of an ONNX model, gate it, and record its lineage.

``compress_model`` is what ``fogline model compress`` runs for every method
(int8 static QDQ, int8 dynamic, fp16, or the int8 search): the candidate is
built in a scratch directory beside ``out``, scored against its parent on the
operator's rows, judged by the gate, timed against the parent, and only then
moved to ``out`` with its ``<out>.compression.json`` sidecar. A model that
misses the gate raises ``GateError`` and leaves nothing behind.

NOTE: torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cloud.pipeline.fp16 import FP16, convert_fp16
from cloud.pipeline.gate import GateError, QualityGate
from cloud.pipeline.model_data import ModelData
from cloud.pipeline.quality import first_output, score_outputs
from cloud.pipeline.quant_search import Scorer, SearchResult, search
from cloud.pipeline.quantize import INT8_METHODS, QuantConfig, quantize
from cloud.pipeline.sidecar import Sidecar, parse_sidecar, sidecar_path, write_sidecar
from cloud.pipeline.speed_compare import Speed, measure, session_runner
from common.errors import InvalidInputError
from common.lineage import LATENCY_P50_MS_B1, SIZE_BYTES, THROUGHPUT_B32
from common.manifest import sha256_file

logger = logging.getLogger(__name__)

SEARCH = "search"
METHODS = (*INT8_METHODS, FP16, SEARCH)
RECORD_BATCH = 32  # the sidecar's throughput_b32


class SearchGateError(GateError):
    """No configuration the search tried passed; ``search`` has the table."""

    def __init__(self, message: str, search: SearchResult) -> None:
        super().__init__(message)
        self.search = search


@dataclass(frozen=True)
class Outcome:
    record: Sidecar
    parent_size: int
    parent_speed: Speed
    speed: Speed
    search: SearchResult | None = None


def make_scorer(fp32: Path, data: ModelData) -> tuple[str, float, Scorer]:
    """(metric, parent quality, score(model)) on ``data``; without labels or a reference,
    a model is judged by its closeness to the parent's own outputs."""
    parent_out = first_output(fp32, data)
    metric, parent_quality = score_outputs(parent_out, data)

    def score(path: Path) -> float:
        return score_outputs(first_output(path, data), data, baseline=parent_out)[1]

    return metric, parent_quality, score


@contextmanager
def _scratch(out: Path) -> Iterator[Path]:
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compress_model(
    fp32: Path,
    out: Path,
    *,
    method: str,
    calibration: dict[str, np.ndarray],
    data: ModelData,
    gate: QualityGate,
    config: QuantConfig | None = None,
    calibration_batch: int = 64,
    speed_batch: int = RECORD_BATCH,
    rounds: int = 3,
) -> Outcome:
    """Build, gate, time and write ``out`` plus its sidecar; see the module docstring."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; use one of {METHODS}")
    fp32, out = Path(fp32), Path(out)
    if out.resolve() == fp32.resolve():
        raise InvalidInputError(f"--out {out} would overwrite the input model")
    metric, parent_quality, score = make_scorer(fp32, data)
    found: SearchResult | None = None
    with _scratch(out) as work:
        if method == SEARCH:
            found = search(
                fp32, calibration, data, work, score, gate, metric=metric,
                parent_quality=parent_quality, speed_batch=speed_batch,
                calibration_batch=calibration_batch, rounds=rounds,
            )  # fmt: skip
            best = found.best
            if best is None:
                closest = max(found.trials, key=lambda t: t.quality if t.size_bytes else -1.0)
                raise SearchGateError(
                    f"none of the {len(found.trials)} int8 configurations tried passed; the "
                    f"closest ({closest.config.label()}): {closest.miss}; nothing written",
                    found,
                )
            candidate, config, method = best.path, best.config, best.config.method
            quality = best.quality
        elif method == FP16:
            candidate, config = convert_fp16(fp32, work / "candidate.onnx"), None
            quality = score(candidate)
        else:
            config = replace(config or QuantConfig(), method=method)
            candidate = quantize(
                fp32, work / "candidate.onnx", config, calibration, batch=calibration_batch
            )
            quality = score(candidate)
        gate.check(method, metric, parent_quality, quality)
        speeds = measure(
            {"parent": session_runner(fp32), "model": session_runner(candidate)},
            data.inputs, batch=RECORD_BATCH, rounds=rounds,
        )  # fmt: skip
        record = Sidecar(
            method=method,
            params=config.params() if config is not None else {"keep_io_types": True},
            parent_sha256=sha256_file(fp32),
            quality_metric=metric,
            metrics={
                "quality": quality,
                "parent_quality": parent_quality,
                SIZE_BYTES: candidate.stat().st_size,
                LATENCY_P50_MS_B1: speeds["model"].latency_p50_ms_b1,
                THROUGHPUT_B32: speeds["model"].throughput,
            },
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(out).unlink(missing_ok=True)  # never a stale sidecar beside a new model
        parse_sidecar(record.to_dict())  # one the packager would refuse stops here, not later
        os.replace(candidate, out)
        write_sidecar(out, record)
    logger.info("compressed %s -> %s (%s)", fp32, out, method)
    return Outcome(record, fp32.stat().st_size, speeds["parent"], speeds["model"], found)
