"""One int8 configuration, applied with ONNX Runtime's quantizer.

``QuantConfig`` names everything that changes the result: static (QDQ,
calibrated activations) or dynamic (weights only, activations quantized at run
time: MatMulInteger), per-channel weights, the calibration method, and which
op types or named nodes stay fp32. The search (``cloud.pipeline.quant_search``)
tries several of them; ``compress`` applies one. The same dict goes into the
``<out>.compression.json`` lineage sidecar, so a version says how it was made.

NOTE: torch-free; onnxruntime.quantization is imported where used.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidInputError

logger = logging.getLogger(__name__)

STATIC = "int8-static-qdq"
DYNAMIC = "int8-dynamic"
INT8_METHODS = (STATIC, DYNAMIC)
CALIBRATIONS = ("minmax", "entropy", "percentile")
# Ops whose weights carry the size and the time (Gather: embedding tables, half of a
# small transformer's bytes). Softmax itself is not quantized, so probabilities (and
# the uncertainty scores made from them) stay fp32 math.
# Attention and EmbedLayerNormalization exist only in a fused transformer graph
# (``cloud.pipeline.fusion``); only dynamic quantization knows them (QAttention,
# QEmbedLayerNormalization), static QDQ leaves them fp32.
DEFAULT_OP_TYPES = ("Gemm", "MatMul", "Conv", "Gather", "Attention", "EmbedLayerNormalization")
COMPUTE_OP_TYPES = ("Gemm", "MatMul", "Conv", "Attention")
DYNAMIC_ONLY_OP_TYPES = ("Attention", "EmbedLayerNormalization")
# Ops that read a weight table rather than multiply by it.
TABLE_OP_TYPES = ("Gather", "EmbedLayerNormalization")
# Activation ranges settle within a few batches; more rows only cost time (MinMax keeps
# every activation of every row in memory, the histogram methods bin each one).
_CALIBRATION_ROWS = {"minmax": 256, "entropy": 64, "percentile": 64}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; ``params()`` is what the lineage sidecar records."""

    method: str = STATIC
    per_channel: bool = True
    calibration: str = "minmax"  # static only
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_op_types: tuple[str, ...] = ()  # op types left fp32 (subtracted from op_types)
    exclude_nodes: tuple[str, ...] = field(default=())  # node names left fp32
    # 7-bit weights: room for the u8*s8 pair sums on CPUs without VNNI (no overflow).
    reduce_range: bool = False
    weight_symmetric: bool = True  # False: a zero point per weight channel/tensor
    activation_symmetric: bool = False  # static only: zero point 0 for activations

    def __post_init__(self) -> None:
        if self.method not in INT8_METHODS:
            raise InvalidInputError(f"unknown int8 method {self.method!r}; use {INT8_METHODS}")
        if self.calibration not in CALIBRATIONS:
            raise InvalidInputError(
                f"unknown calibration {self.calibration!r}; use one of {CALIBRATIONS}"
            )
        if not self.quantized_op_types:
            raise InvalidInputError("every op type is excluded: nothing left to quantize")

    @property
    def quantized_op_types(self) -> list[str]:
        dropped = set(self.exclude_op_types)
        if self.method == STATIC:
            dropped |= set(DYNAMIC_ONLY_OP_TYPES)
        return [t for t in self.op_types if t not in dropped]

    def label(self) -> str:
        """A short name for tables: ``static pc minmax -MatMul``."""
        parts = [
            "static" if self.method == STATIC else "dynamic",
            "per-channel" if self.per_channel else "per-tensor",
        ]
        if self.method == STATIC:
            parts.append(self.calibration)
        parts += [f"-{t}" for t in self.exclude_op_types]
        if self.reduce_range:
            parts.append("reduce-range")
        if not self.weight_symmetric:
            parts.append("asym-weights")
        if self.activation_symmetric and self.method == STATIC:
            parts.append("sym-act")
        if self.exclude_nodes:
            parts.append(f"-{len(self.exclude_nodes)} nodes")
        return " ".join(parts)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "per_channel": self.per_channel,
            "op_types_to_quantize": self.quantized_op_types,
            "nodes_to_exclude": list(self.exclude_nodes),
        }
        if self.method == STATIC:
            params["calibration"] = self.calibration
        # Rounding options only where they differ from ORT's defaults (older records stay as
        # they were).
        if self.reduce_range:
            params["reduce_range"] = True
        if not self.weight_symmetric:
            params["weight_symmetric"] = False
        if self.activation_symmetric and self.method == STATIC:
            params["activation_symmetric"] = True
        return params

    def extra_options(self) -> dict[str, Any]:
        """ORT quantizer ``extra_options`` for this config."""
        import onnx

        # Fused ops (Attention, SkipLayerNormalization, ...) are in another domain, so
        # shape inference cannot type their outputs: they are float.
        options: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        # NOTE: set only when asked: an explicit WeightSymmetric also applies to tensors
        # ORT would otherwise treat by their type (it changed a static CNN's accuracy).
        if not self.weight_symmetric:
            options["WeightSymmetric"] = False
        if self.activation_symmetric and self.method == STATIC:
            options["ActivationSymmetric"] = True
        return options


def _calibration_reader(feeds: dict[str, np.ndarray], batch: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    rows = len(next(iter(feeds.values())))

    class RowsReader(CalibrationDataReader):
        """Feeds the calibration rows (every input) in batches, once."""

        def __init__(self) -> None:
            self._batches = iter(range(0, rows, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._batches, None)
            if start is None:
                return None
            return {k: v[start : start + batch] for k, v in feeds.items()}

    return RowsReader()


def pre_process(fp32_path: Path, out: Path) -> Path:
    """ORT's recommended pre-pass (optimise, infer shapes) before quantizing.

    NOTE: symbolic shape inference fails on transformer exports such as MiniLM
    (it cannot follow the attention-mask arithmetic), so it is skipped; ONNX's own
    shape inference still runs.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
    return out


def _check_nodes(model_path: Path, names: tuple[str, ...]) -> None:
    import onnx

    known = {n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node}
    unknown = sorted(set(names) - known)
    if unknown:
        raise InvalidInputError(f"{model_path.name} has no node(s) named {unknown}")


class NothingQuantizedError(InvalidInputError):
    """The configuration matched no node the quantizer can handle (e.g. dynamic Gemm)."""


def _check_quantized(path: Path, config: QuantConfig) -> None:
    """Refuse a "quantized" model with no int8 weight in it: it would only be mislabelled."""
    import onnx

    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    model = onnx.load(str(path), load_external_data=False)
    if not any(t.data_type in int8 for t in model.graph.initializer):
        path.unlink(missing_ok=True)
        raise NothingQuantizedError(
            f"{config.label()} quantized no weight of this model "
            f"(op types {config.quantized_op_types})"
        )


def quantize(
    fp32_path: Path,
    out: Path,
    config: QuantConfig,
    calibration: dict[str, np.ndarray] | None = None,
    *,
    batch: int = 64,
) -> Path:
    """Write the int8 model for ``config``; ``calibration`` feeds static activation ranges
    (dynamic quantization needs none)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if config.method == STATIC and (not calibration or len(next(iter(calibration.values()))) == 0):
        raise InvalidInputError("quantization needs at least one calibration row")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: ORT's calibrators print progress on stdout; keep stdout for our results (--json).
    with tempfile.TemporaryDirectory(prefix="fogline-quant-") as tmp, redirect_stdout(sys.stderr):
        prepared = pre_process(Path(fp32_path), Path(tmp) / "prepared.onnx")
        _check_nodes(prepared, config.exclude_nodes)
        common: dict[str, Any] = {
            "op_types_to_quantize": config.quantized_op_types,
            "per_channel": config.per_channel,
            "nodes_to_exclude": list(config.exclude_nodes),
            "weight_type": QuantType.QInt8,
            "reduce_range": config.reduce_range,
            "extra_options": config.extra_options(),
        }
        if config.method == DYNAMIC:
            quantize_dynamic(str(prepared), str(out), **common)
        else:
            method = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[config.calibration]
            rows = _CALIBRATION_ROWS[config.calibration]
            assert calibration is not None  # checked above
            calibration = {k: v[:rows] for k, v in calibration.items()}
            quantize_static(
                str(prepared),
                str(out),
                _calibration_reader(calibration, batch),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                calibrate_method=method,
                **common,
            )
    _check_quantized(out, config)
    logger.info(
        "quantized %s -> %s (%s, %d bytes)", fp32_path, out, config.label(), out.stat().st_size
    )
    return out
