"""Build a model package directory and its (unsigned) manifest.

The pipeline stops short of signing: only the control plane holds the key
(``SignedManifest.sign`` + ``write_package``). What this module guarantees is
that the manifest describes exactly the files on disk, and that the golden
outputs are what ONNX Runtime really produced for the golden inputs.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx

from cloud.pipeline.model_data import fixed_batch
from cloud.pipeline.onnx_model import has_external_data, predict, run_outputs
from cloud.pipeline.sidecar import Sidecar
from cloud.pipeline.speed import measure_speed
from common.errors import InvalidInputError
from common.golden import GOLDEN_FILE, save_golden
from common.lineage import LATENCY_P50_MS_B1, SIZE_BYTES, THROUGHPUT_B32, Lineage, parse_ref
from common.manifest import Manifest, RoutingHints, Target, file_entry
from common.onnx_runtime import describe_onnx_io
from common.text import TOKENIZER_FILE, TOKENIZER_ROLE
from kernels.uncertainty import score, threshold_for_fraction

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TASK = "image-classification"


def _copy_model(model_path: Path, dest: Path) -> None:
    """Copy atomically, refusing a model that would need files beside it."""
    if has_external_data(onnx.load(str(model_path), load_external_data=False)):
        raise InvalidInputError(f"{model_path}: ONNX models with external data are refused")
    if model_path.resolve() == dest.resolve():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(model_path, tmp)
    tmp.replace(dest)


def _copy_tokenizer(source: Path, out_dir: Path) -> Path:
    """Copy ``tokenizer.json``, refusing one the serving library cannot load."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(source))
    except Exception as exc:  # the Rust side raises its own exception type
        raise InvalidInputError(f"cannot load tokenizer {source}: {exc}") from exc
    dest = out_dir / TOKENIZER_FILE
    if source.resolve() != dest.resolve():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(dest)
    return dest


def _write_golden(model_path: Path, dest: Path, rows: np.ndarray | dict[str, np.ndarray]) -> None:
    """Run the packaged model on ``rows`` and store inputs and every output together.

    ``rows`` is one array per input name, or bare rows for a single-input model.
    """
    inputs, _ = describe_onnx_io(model_path)
    if isinstance(rows, np.ndarray):
        if len(inputs) != 1:
            raise InvalidInputError("golden rows without input names need a single-input model")
        rows = {inputs[0].name: np.ascontiguousarray(rows, dtype=np.float32)}
    first = next(iter(rows.values()), np.empty(0))
    if first.ndim == 0 or len(first) == 0:
        raise InvalidInputError("golden rows must be a non-empty batch")
    save_golden(dest, rows, run_outputs(model_path, rows))


def build_package(
    model_path: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    release: int,
    variant: str,
    precision: str,
    golden_rows: np.ndarray | dict[str, np.ndarray],
    evaluation: dict[str, float],
    routing: RoutingHints,
    parent: str | None = None,
    task: str = TASK,
    lineage: Lineage | None = None,
    tokenizer: Path | None = None,
) -> Manifest:
    """Write ``model.onnx`` and ``golden.npz`` into ``out_dir``; return the unsigned manifest.

    ``tokenizer`` (a ``tokenizer.json``) ships as a signed file of its own, so the
    servers can take text for this model (``common.text``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dest = out_dir / MODEL_FILE
    _copy_model(Path(model_path), model_dest)
    golden_dest = out_dir / GOLDEN_FILE
    _write_golden(model_dest, golden_dest, golden_rows)
    inputs, outputs = describe_onnx_io(model_dest)
    files = [file_entry(model_dest, "model"), file_entry(golden_dest, "golden")]
    if tokenizer is not None:
        files.append(file_entry(_copy_tokenizer(Path(tokenizer), out_dir), TOKENIZER_ROLE))
    manifest = Manifest(
        name=name,
        version=version,
        release=release,
        variant=variant,
        task=task,
        format="onnx",
        precision=precision,
        files=files,
        inputs=inputs,
        outputs=outputs,
        target=Target(),
        routing=routing,
        evaluation={k: float(v) for k, v in evaluation.items()},
        parent=parent,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        lineage=lineage,
    )
    manifest.validate()
    logger.info("packaged %s %s (%s, %s) in %s", name, version, variant, precision, out_dir)
    return manifest


def package_lineage(parent: str | None, method: str | None, sidecar: Sidecar | None) -> Lineage:
    """The manifest's lineage from ``--parent``/``--method`` and the sidecar (flags win).

    A model with a compression sidecar was made from a parent. Without ``--parent``
    (the parent was never published: an operator's own fp32 model, say) the lineage
    records the method and the parent's file digest, and no registry version.
    """
    if parent is not None:
        parse_ref(parent, "--parent")
    chosen = method or (sidecar.method if sidecar else None)
    if chosen is None:
        if parent is not None:
            raise InvalidInputError("--parent needs --method (how this was made from it)")
        chosen = "train"
    lineage = Lineage(
        method=chosen,
        parent=parent,
        params=sidecar.params if sidecar else {},
        parent_sha256=sidecar.parent_sha256 if sidecar else None,
    )
    lineage.validate()
    return lineage


def version_figures(
    model_path: Path, rows: np.ndarray | dict[str, np.ndarray], sidecar: Sidecar | None
) -> dict[str, float]:
    """Size, latency p50 at batch 1 and throughput at batch 32 for the manifest.

    The sidecar's speed figures are kept when it has them (measured by the compression
    step beside its parent's); otherwise they are measured here, unless the model
    insists on a fixed batch size.
    """
    figures: dict[str, float] = {SIZE_BYTES: float(Path(model_path).stat().st_size)}
    if sidecar is not None:
        figures.update(sidecar.evaluation())
    specs, _ = describe_onnx_io(Path(model_path))
    if not {LATENCY_P50_MS_B1, THROUGHPUT_B32} <= set(figures) and fixed_batch(specs) is None:
        feeds = rows if isinstance(rows, dict) else {specs[0].name: rows}
        figures = {**measure_speed(Path(model_path), feeds), **figures}
    return figures


def calibrate_routing(
    model_path: Path,
    x_val: np.ndarray,
    *,
    metric: str = "max_prob",
    escalate_fraction: float = 0.15,
    max_local_batch: int = 8,
) -> RoutingHints:
    """Pick the uncertainty threshold that escalates ``escalate_fraction`` of val rows."""
    if not 0.0 <= escalate_fraction <= 1.0:
        raise InvalidInputError(f"escalate_fraction must be in [0, 1], got {escalate_fraction}")
    if max_local_batch < 1:
        raise InvalidInputError(f"max_local_batch must be at least 1, got {max_local_batch}")
    try:
        scores = score(metric, predict(Path(model_path), x_val))
    except ValueError as exc:  # unknown metric
        raise InvalidInputError(str(exc)) from exc
    threshold = threshold_for_fraction(scores, escalate_fraction)
    logger.info(
        "routing: %s threshold %.4g escalates %.1f%% of %d val rows",
        metric,
        threshold,
        100.0 * float((scores > threshold).mean()),
        len(scores),
    )
    return RoutingHints(
        uncertainty_metric=metric,
        uncertainty_threshold=threshold,
        max_local_batch=max_local_batch,
    )
