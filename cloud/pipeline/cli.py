"""``fogline model …``: train, compress and package models from the command line.

NOTE: importing this module must stay cheap and torch-free (the ``fogline``
entry point imports it on edge devices too); handlers import the pipeline.

Any ONNX model goes through ``compress`` and ``package`` with ``--data D.npz``
(one array per input name, plus ``labels`` or ``reference``: see
``cloud.pipeline.model_data``). Without ``--data`` they use the built-in
digits split (``DATA_SEED``), so the test rows they report on were never
trained on. Bad input (a model that does not load, data that does not fit it)
is one ``error:`` line and exit 1, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.pipeline.compress_cli import add_compress
from cloud.pipeline.engine_cli import add_build_engine, add_package_engine
from cloud.pipeline.train_cli import add_train
from common.cli_errors import one_line_errors
from common.errors import InvalidInputError
from common.manifest import ACCURACY, UNSIGNED_MANIFEST_FILE, write_unsigned

if TYPE_CHECKING:
    from cloud.pipeline.data import Split
    from cloud.pipeline.model_data import ModelData
    from common.manifest import RoutingHints

logger = logging.getLogger(__name__)

DATA_SEED = 0
GOLDEN_ROWS = 8
DIGITS_MAX_LOCAL_BATCH = 8


_DATA_HELP = "rows for any model: one array per input name, plus optional 'labels' or 'reference'"


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _split() -> Split:
    from cloud.pipeline.data import load_digits_split

    return load_digits_split(DATA_SEED)


def _load_data(model: Path, data: Path) -> ModelData:
    """Check that the model loads and ``data`` fits its inputs, before anything is written."""
    from cloud.pipeline.model_data import load_model_data
    from cloud.pipeline.onnx_model import check_loads
    from common.onnx_runtime import describe_onnx_io

    check_loads(model)
    inputs, _ = describe_onnx_io(model)
    return load_model_data(data, inputs)


def _check_digits_model(model: Path) -> None:
    """Without --data the digits rows are used: refuse a model they cannot feed."""
    from cloud.pipeline.onnx_model import check_loads
    from common.onnx_runtime import describe_onnx_io

    check_loads(model)
    inputs, _ = describe_onnx_io(model)
    if len(inputs) != 1 or inputs[0].datatype != "FP32" or inputs[0].shape[1:] != [64]:
        raise InvalidInputError(
            f"{model} takes {[(i.name, i.datatype, i.shape) for i in inputs]}, not digits "
            "(one FP32 [N, 64] input): give its rows with --data D.npz"
        )


PackageInputs = tuple[Any, dict[str, float], "RoutingHints", str]


def _digits_package_inputs(args: argparse.Namespace) -> PackageInputs:
    """Golden rows, evaluation, routing and task for a digits model (no --data)."""
    from cloud.pipeline.compress import evaluate
    from cloud.pipeline.package import TASK, calibrate_routing

    split = _split()
    routing = calibrate_routing(
        args.model,
        split.x_val,
        metric=args.metric,
        escalate_fraction=args.escalate_fraction,
        max_local_batch=args.max_local_batch or DIGITS_MAX_LOCAL_BATCH,
    )
    evaluation = {
        ACCURACY: evaluate(args.model, split.x_test, split.y_test),  # the test split
        "val_accuracy": evaluate(args.model, split.x_val, split.y_val),
    }
    return split.x_test[:GOLDEN_ROWS], evaluation, routing, TASK


def _data_package_inputs(args: argparse.Namespace) -> PackageInputs:
    """The same from the operator's D.npz, for any model."""
    from cloud.pipeline.model_data import fixed_batch
    from cloud.pipeline.quality import first_output, score_outputs
    from cloud.pipeline.routing import calibrate_for_data, looks_like_probabilities
    from common.onnx_runtime import describe_onnx_io

    data = _load_data(args.model, args.data)
    specs, _ = describe_onnx_io(args.model)
    out = first_output(args.model, data)
    routing = calibrate_for_data(
        args.model,
        specs,
        data,
        out,
        metric=args.metric,
        escalate_fraction=args.escalate_fraction,
        max_local_batch=args.max_local_batch,
        latency_budget_ms=args.latency_budget_ms,
    )
    metric, quality = score_outputs(out, data)
    evaluation = {} if data.labels is None and data.reference is None else {metric: quality}
    classifier = data.labels is not None or looks_like_probabilities(out)
    golden = data.head(fixed_batch(specs) or GOLDEN_ROWS)
    return golden, evaluation, routing, "classification" if classifier else "inference"


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A scratch dir beside ``out``; its files land in ``out`` only if the block succeeds."""
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for f in stage.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def cmd_package(args: argparse.Namespace) -> int:
    """Build the package dir and write its unsigned manifest beside the files."""
    from cloud.pipeline.package import build_package, package_lineage, version_figures
    from cloud.pipeline.sidecar import read_sidecar

    sidecar = read_sidecar(args.model)
    lineage = package_lineage(args.parent, args.method, sidecar)  # checked before any work
    if args.data is not None:
        golden, evaluation, routing, task = _data_package_inputs(args)
    else:
        _check_digits_model(args.model)
        golden, evaluation, routing, task = _digits_package_inputs(args)
    evaluation = {**evaluation, **version_figures(args.model, golden, sidecar)}
    out = Path(args.out)
    with _staged(out) as stage:
        manifest = build_package(
            args.model,
            stage,
            name=args.name,
            version=args.version,
            release=args.release,
            variant=args.variant,
            precision=args.precision,
            golden_rows=golden,
            evaluation=evaluation,
            routing=routing,
            lineage=lineage,
            task=task,
        )
        write_unsigned(stage, manifest)
    figures = ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()) or "no labels"
    print(
        f"wrote package {out}: {manifest.name} {manifest.version} "
        f"({manifest.variant}, {manifest.precision}, {task}), {figures}, "
        f"{routing.uncertainty_metric} threshold {routing.uncertainty_threshold:.4g}, "
        f"max local batch {routing.max_local_batch}; unsigned manifest in "
        f"{out / UNSIGNED_MANIFEST_FILE}"
    )
    return 0


def _add_package(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "package",
        help="build a model package dir with an unsigned manifest",
        description="Copy the model into DIR as model.onnx, record golden outputs, calibrate "
        f"routing hints and write {UNSIGNED_MANIFEST_FILE}; the V2 signature comes from the "
        "model's own inputs and outputs. With --data D.npz the golden rows, evaluation and "
        "hints come from those rows (uncertainty threshold if the first output is class "
        "probabilities; largest local batch from latency measured here); without it, from "
        "the digits split. The control plane signs the package on upload.",
    )
    p.add_argument("--model", type=_existing_file, required=True, help="ONNX model to package")
    p.add_argument("--data", type=_existing_file, default=None, metavar="D.npz", help=_DATA_HELP)
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
    p.add_argument(
        "--parent",
        default=None,
        metavar="NAME:VERSION",
        help="the published version this one was made from (it must be in the registry "
        "at publish); default: none, a model trained from scratch",
    )
    p.add_argument(
        "--method",
        default=None,
        help="how it was made from the parent, e.g. train, int8-static-qdq, "
        "prune-structured-30%%, distill (default: from MODEL.compression.json beside the "
        "model if present, else train)",
    )
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
        default=None,
        help="requests with more rows go to the cloud (default: measured with --data, else 8)",
    )
    p.add_argument(
        "--latency-budget-ms",
        type=float,
        default=10.0,
        help="with --data: the largest local batch is the largest whose median run on one "
        "thread stays within this (default 10)",
    )
    p.set_defaults(func=one_line_errors(cmd_package))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``compress``, ``build-engine``, ``package`` and ``package-engine``."""
    add_train(subparsers)
    add_compress(subparsers)
    add_build_engine(subparsers)
    _add_package(subparsers)
    add_package_engine(subparsers)
