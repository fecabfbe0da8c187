"""``fogline model …``: train, compress and package models from the command line.

NOTE: importing this module must stay cheap and torch-free (the ``fogline``
entry point imports it on edge devices too); handlers import the pipeline.

Every command uses the same fixed data split (``DATA_SEED``), so the
test rows that ``compress`` and ``package`` report on were never trained on;
``--seed`` only changes the weight initialisation and batch order.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import FoglineError
from common.manifest import UNSIGNED_MANIFEST_FILE, write_unsigned

if TYPE_CHECKING:
    from cloud.pipeline.compress import CompressionReport
    from cloud.pipeline.data import Split

logger = logging.getLogger(__name__)

DATA_SEED = 0
GOLDEN_ROWS = 8

Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Handler) -> Handler:
    """Turn Fogline and file errors into a one-line message and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FoglineError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    run.__doc__ = handler.__doc__
    return run


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _split() -> Split:
    from cloud.pipeline.data import load_digits_split

    return load_digits_split(DATA_SEED)


def cmd_train(args: argparse.Namespace) -> int:
    """Train, export to ONNX, report test accuracy of the exported file."""
    from cloud.pipeline.compress import evaluate
    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.train import default_progress, train_model

    split = _split()
    print(f"training {args.kind} model (seed {args.seed})", file=sys.stderr)
    model = train_model(
        args.kind, split, epochs=args.epochs, seed=args.seed, progress=default_progress()
    )
    path = export_onnx(model, args.out)
    acc = evaluate(path, split.x_test, split.y_test)
    print(f"wrote {path} ({path.stat().st_size} bytes), test accuracy {acc:.2%}")
    return 0


def format_report(report: CompressionReport) -> str:
    """A small fp32-vs-int8 table for humans."""
    rows = [
        ("", "fp32", "int8"),
        ("test accuracy", f"{report.fp32_accuracy:.2%}", f"{report.int8_accuracy:.2%}"),
        ("bytes", str(report.fp32_bytes), str(report.int8_bytes)),
    ]
    lines = [f"{a:<14} {b:>10} {c:>10}" for a, b, c in rows]
    lines.append(
        f"accuracy drop {report.drop_points:+.2f} points, size ratio {report.size_ratio:.2f}x"
    )
    return "\n".join(lines)


def cmd_compress(args: argparse.Namespace) -> int:
    """Quantize to int8; exit 1 if accuracy drops more than --max-drop points."""
    from cloud.pipeline.compress import AccuracyDropError, compress

    try:
        report = compress(args.fp32, args.out, _split(), max_drop_points=args.max_drop)
    except AccuracyDropError as exc:
        print(format_report(exc.report))
        print(f"error: int8 model rejected: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    """Build the package dir and write its unsigned manifest beside the files."""
    from cloud.pipeline.compress import evaluate
    from cloud.pipeline.package import build_package, calibrate_routing

    split = _split()
    routing = calibrate_routing(
        args.model,
        split.x_val,
        metric=args.metric,
        escalate_fraction=args.escalate_fraction,
        max_local_batch=args.max_local_batch,
    )
    evaluation = {
        "test_accuracy": evaluate(args.model, split.x_test, split.y_test),
        "val_accuracy": evaluate(args.model, split.x_val, split.y_val),
    }
    manifest = build_package(
        args.model,
        args.out,
        name=args.name,
        version=args.version,
        release=args.release,
        variant=args.variant,
        precision=args.precision,
        golden_rows=split.x_test[:GOLDEN_ROWS],
        evaluation=evaluation,
        routing=routing,
        parent=args.parent,
    )
    path = write_unsigned(Path(args.out), manifest)
    print(
        f"wrote package {args.out}: {manifest.name} {manifest.version} "
        f"({manifest.variant}, {manifest.precision}), test accuracy "
        f"{evaluation['test_accuracy']:.2%}, {routing.uncertainty_metric} threshold "
        f"{routing.uncertainty_threshold:.4g}; unsigned manifest in {path}"
    )
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a digits classifier and export it to ONNX",
        description="Train the edge (small MLP) or cloud (CNN) digits model on the fixed "
        "train split and export it as one ONNX file: input 'input' FP32 [-1, 64] raw "
        "pixels 0..16, output 'probabilities' FP32 [-1, 10].",
    )
    p.add_argument("--kind", choices=["edge", "cloud"], required=True, help="which model")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 60 edge, 30 cloud)")
    p.add_argument("--seed", type=int, default=0, help="weight init / shuffle seed (default 0)")
    p.set_defaults(func=_guarded(cmd_train))


def _add_compress(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="quantize an fp32 ONNX model to int8 and compare them",
        description="Static int8 quantization (QDQ, per-channel weights) calibrated on the "
        "train split; prints fp32 vs int8 test accuracy and file size. Exits 1 if int8 "
        "loses more than --max-drop percentage points.",
    )
    p.add_argument("--fp32", type=_existing_file, required=True, help="fp32 ONNX model")
    p.add_argument("--out", type=Path, required=True, help="int8 ONNX file to write")
    p.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="largest accepted accuracy drop in percentage points (default 1.0)",
    )
    p.set_defaults(func=_guarded(cmd_compress))


def _add_package(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "package",
        help="build a model package dir with an unsigned manifest",
        description="Copy the model into DIR as model.onnx, record golden outputs, calibrate "
        f"routing hints on the val split and write {UNSIGNED_MANIFEST_FILE}. The control plane "
        "signs it on upload.",
    )
    p.add_argument("--model", type=_existing_file, required=True, help="ONNX model to package")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="package directory to write"
    )
    p.add_argument("--name", required=True, help="model name, e.g. digits")
    p.add_argument("--version", required=True, help="version string, e.g. 1")
    p.add_argument("--release", type=int, required=True, help="monotonic release counter")
    p.add_argument(
        "--variant", choices=["edge", "cloud"], required=True, help="where it is meant to run"
    )
    p.add_argument(
        "--precision", choices=["int8", "fp32", "fp16"], required=True, help="weight precision"
    )
    p.add_argument("--parent", default=None, help="version this one derives from")
    p.add_argument(
        "--metric",
        choices=["max_prob", "margin", "entropy"],
        default="max_prob",
        help="uncertainty score used for escalation (default max_prob)",
    )
    p.add_argument(
        "--escalate-fraction",
        type=float,
        default=0.15,
        help="share of val rows the threshold sends to the cloud (default 0.15)",
    )
    p.add_argument(
        "--max-local-batch",
        type=int,
        default=8,
        help="requests with more rows go to the cloud (default 8)",
    )
    p.set_defaults(func=_guarded(cmd_package))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``compress`` and ``package`` to the ``fogline model`` group."""
    _add_train(subparsers)
    _add_compress(subparsers)
    _add_package(subparsers)
