"""``fogline model prune`` and ``fogline model distill``: new versions made from a parent.

NOTE: importing this module must stay cheap and torch-free; handlers import the pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.pipeline.zoo import KIND_ALIASES, ZOO, entry
from common.cli_errors import one_line_errors
from common.errors import InvalidInputError

if TYPE_CHECKING:
    from cloud.pipeline.derive import EvalRows, Spec


def _spec(args: argparse.Namespace) -> Spec:
    from cloud.pipeline.derive import Spec
    from cloud.pipeline.recipe import Recipe

    if args.factory or args.dataset:
        if not (args.factory and args.dataset) or args.arch:
            raise InvalidInputError("give --arch, or --factory with --dataset")
        return Spec(args.factory, args.dataset, Recipe(), args.factory)
    name = args.arch or "digits-edge"
    e = entry(name)
    return Spec(e.model, e.dataset, e.recipe, KIND_ALIASES.get(name, name))


def _rows(args: argparse.Namespace, model: Path) -> EvalRows:
    """--data D.npz (with labels) if given, else the digits test split."""
    from cloud.pipeline.derive import EvalRows

    if args.data is not None:
        from cloud.pipeline.model_data import load_model_data
        from common.onnx_runtime import describe_onnx_io

        data = load_model_data(args.data, describe_onnx_io(model)[0])
        if data.labels is None:
            raise InvalidInputError(f"{args.data}: the gate needs 'labels'")
        return EvalRows(data.inputs, data.labels, str(args.data))
    from cloud.pipeline.data import load_digits_split
    from cloud.pipeline.digits import DATA_SEED, INPUT_NAME

    split = load_digits_split(DATA_SEED)
    return EvalRows({INPUT_NAME: split.x_test}, split.y_test, "digits test split")


def _print(report: dict[str, Any], out: Path, as_json: bool) -> None:
    from cloud.pipeline.sidecar import sidecar_path

    if as_json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        ("accuracy", f"{report['parent_accuracy']:.2%}", f"{report['accuracy']:.2%}"),
        ("ONNX bytes", report["parent_bytes"], report["bytes"]),
        ("deflated bytes", report["parent_zlib_bytes"], report["zlib_bytes"]),
        (
            "p50 ms, batch 1",
            f"{report['parent_latency_p50_ms_b1']:.3f}",
            f"{report['latency_p50_ms_b1']:.3f}",
        ),
        (
            "rows/s, batch 32",
            f"{report['parent_throughput_b32']:.0f}",
            f"{report['throughput_b32']:.0f}",
        ),
    ]
    print(f"{'':<17} {'parent':>12} {report['method']:>24}")
    for label, a, b in rows:
        print(f"{label:<17} {a!s:>12} {b!s:>24}")
    print(
        f"drop {report['drop_points']:+.2f} points on the {report['evaluated_on']}; wrote {out} "
        f"and {sidecar_path(out).name} (package it with --parent NAME:VERSION)"
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from cloud.pipeline.derive import prune_job
    from cloud.pipeline.onnx_model import check_loads

    check_loads(args.model)
    report = prune_job(
        args.model,
        _spec(args),
        _rows(args, args.model),
        args.out,
        kind=args.kind,
        amount=args.amount,
        finetune_epochs=args.finetune_epochs,
        seed=args.seed,
        max_drop=args.max_drop,
    )
    _print(report, args.out, args.json)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from cloud.pipeline.derive import distill_job
    from cloud.pipeline.distill import DistillSettings
    from cloud.pipeline.onnx_model import check_loads

    check_loads(args.teacher)
    report = distill_job(
        args.teacher,
        _spec(args),
        _rows(args, args.teacher),
        args.out,
        settings=DistillSettings(args.temperature, args.alpha),
        epochs=args.epochs,
        seed=args.seed,
        max_drop=args.max_drop,
    )
    _print(report, args.out, args.json)
    return 0


def _architecture_args(
    p: argparse.ArgumentParser, default: str, what: str, max_drop: float, against: str
) -> None:
    p.add_argument(
        "--arch",
        choices=[*ZOO, *KIND_ALIASES],
        default=None,
        help=f"{what} from the zoo (default: {default}); or --factory/--dataset",
    )
    p.add_argument("--factory", metavar="PKG.MODULE:NAME", help="your model factory")
    p.add_argument("--dataset", metavar="PKG.MODULE:NAME", help="your dataset factory")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="D.npz",
        help="labelled rows for the gate (default: the digits test split)",
    )
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=max_drop,
        help=f"gate: largest accepted accuracy drop against {against}, in points "
        f"(default {max_drop:g})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prune`` and ``distill`` to the ``fogline model`` group."""
    prune = subparsers.add_parser(
        "prune",
        help="prune a model (structured or unstructured), fine-tune, gate, export",
        description="Load the parent ONNX model's weights into its PyTorch architecture, prune "
        "it and fine-tune with the training loop, export ONNX (dynamic batch) and keep it only "
        "if it loses at most --max-drop points. structured: removes the least important neurons "
        "and channels, so the ONNX file is smaller and faster. unstructured: zeroes the smallest "
        "weights; ONNX stores them dense, so the file is NOT smaller and NOT faster, only its "
        "deflated size shrinks (reported). Writes OUT and OUT's .compression.json sidecar.",
    )
    prune.add_argument("--model", type=Path, required=True, help="the parent ONNX model")
    prune.add_argument(
        "--kind",
        choices=["structured", "unstructured"],
        default="structured",
        help="structured: remove neurons/channels; unstructured: zero the smallest weights",
    )
    prune.add_argument("--amount", type=float, default=0.3, help="share to prune (default 0.3)")
    prune.add_argument(
        "--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default 10)"
    )
    _architecture_args(prune, "digits-edge", "the parent's architecture", 1.0, "the parent")
    prune.set_defaults(func=one_line_errors(cmd_prune))

    dist = subparsers.add_parser(
        "distill",
        help="train a small student from a teacher ONNX model (knowledge distillation)",
        description="Train the student architecture with temperature-scaled KL to the "
        "teacher's probabilities plus cross-entropy to the labels, export ONNX, and keep it "
        "only if it is within --max-drop points of the teacher. The teacher is the parent.",
    )
    dist.add_argument("--teacher", type=Path, required=True, help="the teacher ONNX model")
    dist.add_argument("--temperature", type=float, default=4.0, help="softmax temperature")
    dist.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher term")
    dist.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    _architecture_args(
        dist, "digits-edge", "the student", 3.0, "the teacher (a student is smaller by design)"
    )
    dist.set_defaults(func=one_line_errors(cmd_distill))
