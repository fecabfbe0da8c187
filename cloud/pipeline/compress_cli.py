"""``fogline model compress``: int8 (static, dynamic, searched) or fp16, gated, with lineage.

NOTE: importing this module must stay cheap and torch-free, like ``cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.pipeline.cli_args import add_model_data_out, bounded
from cloud.pipeline.sidecar import sidecar_path
from common.cli_errors import one_line_errors
from common.lineage import LATENCY_P50_MS_B1, SIZE_BYTES, THROUGHPUT_B32

if TYPE_CHECKING:
    from cloud.pipeline.compressor import Outcome
    from cloud.pipeline.model_data import ModelData
    from cloud.pipeline.quant_search import SearchResult
    from cloud.pipeline.quantize import QuantConfig

METHOD_CHOICES = ("int8-static-qdq", "int8-dynamic", "fp16", "search")


def _digits_rows(fp32: Path) -> tuple[dict[str, Any], ModelData]:
    """Without --data: digits train rows calibrate, labelled test rows judge."""
    from cloud.pipeline.cli import _check_digits_model, _split
    from cloud.pipeline.model_data import ModelData
    from cloud.pipeline.onnx_model import input_name

    _check_digits_model(fp32)
    split, name = _split(), input_name(fp32)
    return {name: split.x_train}, ModelData({name: split.x_test}, labels=split.y_test)


def _config(args: argparse.Namespace) -> QuantConfig:
    from cloud.pipeline.quantize import DEFAULT_OP_TYPES, STATIC, QuantConfig

    return QuantConfig(
        method=args.method if args.method in ("int8-static-qdq", "int8-dynamic") else STATIC,
        per_channel=args.per_channel,
        calibration=args.calibration,
        op_types=DEFAULT_OP_TYPES,
        exclude_op_types=tuple(args.exclude_op_type),
        exclude_nodes=tuple(args.exclude_node),
        reduce_range=args.reduce_range,
        weight_symmetric=args.weight_symmetric,
    )


def _pct(metric: str, q: float) -> str:
    return f"{q:.2%}" if metric in ("accuracy", "r2") else f"{q:.4f}"


def search_rows(result: SearchResult) -> list[dict[str, Any]]:
    """One dict per configuration tried (the JSON form of the table)."""
    best = result.best
    return [
        {
            "config": t.config.label(),
            "method": t.config.method,
            "params": t.config.params(),
            result.metric: t.quality if t.size_bytes else None,
            "size_bytes": t.size_bytes,
            "throughput": t.speed.throughput if t.speed else None,
            "speedup": t.speedup,
            "gate": "pass" if t.passed else t.miss,
            "chosen": t is best,
        }
        for t in result.trials
    ]


def print_search_table(result: SearchResult, stream: Any) -> None:
    """What the search tried: a rich table on a terminal, plain columns when piped."""
    from cloud.cli_output import is_terminal, table

    header = ["", "configuration", result.metric.replace("_", " "), "size", "speedup", "gate"]
    rows = [
        [
            "*" if r["chosen"] else "",
            r["config"],
            _pct(result.metric, r[result.metric]) if r[result.metric] is not None else "-",
            f"{r['size_bytes'] / result.parent_size:.0%}" if r["size_bytes"] else "-",
            f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-",
            r["gate"],
        ]
        for r in search_rows(result)
    ]
    batch = result.parent_speed.batch
    caption = (
        f"fp32 parent: {result.metric.replace('_', ' ')} "
        f"{_pct(result.metric, result.parent_quality)}, {result.parent_speed.throughput:.1f} "
        f"rows/s at batch {batch}; speedup = throughput ratio, interleaved; * = kept"
    )
    if is_terminal(stream):
        from rich.console import Console
        from rich.table import Table

        t = Table(*header, title="int8 search", caption=caption)
        for row in rows:
            t.add_row(*row)
        Console(file=stream).print(t)
    else:
        print(table(rows, header), file=stream)
        print(caption, file=stream)


def format_outcome(o: Outcome) -> str:
    """fp32 parent vs the compressed model, for humans."""
    m, metric, parent = o.record.metrics, o.record.quality_metric or "quality", o.parent_speed
    label = "test accuracy" if metric == "accuracy" else metric.replace("_", " ")
    size = int(m[SIZE_BYTES])
    rows = [
        ("", "fp32", o.record.method),
        (label, f"{m['parent_quality']:.2%}", f"{m['quality']:.2%}"),
        ("bytes", str(o.parent_size), str(size)),
        ("p50 ms batch 1", f"{parent.latency_p50_ms_b1:.3f}", f"{m[LATENCY_P50_MS_B1]:.3f}"),
        ("rows/s batch 32", f"{parent.throughput:.1f}", f"{m[THROUGHPUT_B32]:.1f}"),
    ]
    lines = [f"{a:<16} {b:>12} {c:>16}" for a, b, c in rows]
    lines.append(
        f"{metric.replace('_', ' ')} drop {(m['parent_quality'] - m['quality']) * 100:+.2f} "
        f"points, size ratio {o.parent_size / size:.2f}x, throughput "
        f"{m[THROUGHPUT_B32] / parent.throughput:.2f}x (ONNX Runtime CPU, 1 thread)"
    )
    return "\n".join(lines)


def _run(
    args: argparse.Namespace, calibration: dict[str, Any], data: ModelData, batch: int
) -> Outcome:
    from cloud.pipeline.compressor import compress_model
    from cloud.pipeline.gate import QualityGate

    return compress_model(
        args.fp32,
        args.out,
        method=args.method,
        calibration=calibration,
        data=data,
        gate=QualityGate(max_drop_points=args.max_drop, min_cosine=args.min_cosine),
        config=_config(args),
        calibration_batch=batch,
        speed_batch=args.speed_batch,
    )


def cmd_compress(args: argparse.Namespace) -> int:
    """Build, gate and write the compressed model and its lineage sidecar."""
    from cloud.pipeline.cli import _load_data
    from cloud.pipeline.compressor import SearchGateError
    from cloud.pipeline.model_data import fixed_batch
    from common.onnx_runtime import describe_onnx_io

    if args.data is not None:
        data = _load_data(args.fp32, args.data)
        calibration = data.inputs
    else:
        calibration, data = _digits_rows(args.fp32)
    inputs, _ = describe_onnx_io(args.fp32)
    try:
        outcome = _run(args, calibration, data, fixed_batch(inputs) or 64)
    except SearchGateError as exc:  # show what was tried, then the one error line
        if not args.json:
            print_search_table(exc.search, sys.stdout)
        raise

    if args.json:
        doc: dict[str, Any] = {"out": str(args.out), "record": outcome.record.to_dict()}
        if outcome.search is not None:
            doc["search"] = search_rows(outcome.search)
        print(json.dumps(doc, indent=2))
        return 0
    if outcome.search is not None:
        print_search_table(outcome.search, sys.stdout)
    print(format_outcome(outcome))
    print(f"wrote {args.out} and {sidecar_path(args.out).name}")
    return 0


_unit = bounded(float, 0.0, 1.0)
_points = bounded(float, -100.0, 100.0, " points")  # negative: demand a gain
_batch = bounded(int, 1, 4096)


def add_compress(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="int8 / fp16 compression of an ONNX model, gated on measured quality",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Compress an fp32 ONNX model with ONNX Runtime: int8 static (QDQ, "
        "calibrated), int8 dynamic (MatMulInteger), fp16 (fp32 I/O kept; for GPU targets), "
        "or 'search': try int8 configurations (per-channel, calibration method, rounding "
        "options, layers kept fp32), print what was tried and keep the fastest that passes "
        "the gate. With --data D.npz (one array per model input plus optional 'labels' or "
        "'reference') it is calibrated and judged on those rows; without it, the digits "
        "split. The gate: at most --max-drop points of accuracy (or R²) lost, or mean "
        "cosine at least "
        "--min-cosine for embeddings; a miss exits 1 and writes nothing. On success writes "
        "--out and OUT.compression.json (method, parameters, parent sha256, metrics).",
    )
    add_model_data_out(
        p,
        model_flag="--fp32",
        model_help="fp32 ONNX model",
        data_help="rows: one array per input name, plus optional 'labels' or 'reference' "
        "(none: the digits split)",
        out_help="compressed ONNX file to write",
    )
    p.add_argument("--method", choices=METHOD_CHOICES, default="int8-static-qdq", help="how")
    p.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8 weights with one scale per output channel",
    )
    p.add_argument(
        "--calibration",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="static int8: how activation ranges are set",
    )
    p.add_argument(
        "--exclude-op-type",
        action="append",
        default=[],
        metavar="OP",
        help="keep this op type fp32 (repeatable; quantized: Gemm, MatMul, Conv, Gather, "
        "and in fused transformer graphs Attention, EmbedLayerNormalization)",
    )
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="int8: 7-bit weights (no u8 x s8 saturation on CPUs without VNNI)",
    )
    p.add_argument(
        "--weight-symmetric",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8: symmetric weights (no zero point)",
    )
    p.add_argument(
        "--exclude-node",
        action="append",
        default=[],
        metavar="NAME",
        help="keep this node fp32 (repeatable; names as in the model after ORT pre-processing)",
    )
    p.add_argument(
        "--max-drop",
        type=_points,
        default=1.0,
        help="gate: largest accuracy (or R²) drop in points; negative demands a gain",
    )
    p.add_argument(
        "--min-cosine", type=_unit, default=0.99, help="gate: lowest mean cosine (embeddings)"
    )
    p.add_argument(
        "--speed-batch",
        type=_batch,
        default=32,
        help="search: the batch whose throughput picks the winner",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=one_line_errors(cmd_compress))
