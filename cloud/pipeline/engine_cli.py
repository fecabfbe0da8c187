"""``fogline model build-engine``: a TensorRT engine from an ONNX model (GPU machines only).

Exit status: 0 built, 1 bad input or a TensorRT build error, 3 skipped because
tensorrt or a CUDA GPU is absent (one ``skipped:`` line on stderr).

NOTE: importing this module must stay cheap and torch-free, like ``cli``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli_errors import one_line_errors

SKIPPED_EXIT = 3


def cmd_build_engine(args: argparse.Namespace) -> int:
    from cloud.pipeline.engine import EngineSkipped, build, probe
    from cloud.pipeline.onnx_model import check_loads

    check_loads(args.model)
    calibration = None
    if args.data is not None:
        from cloud.pipeline.cli import _load_data

        calibration = _load_data(args.model, args.data).inputs
    elif args.precision == "int8":
        from common.errors import InvalidInputError

        raise InvalidInputError("--precision int8 needs calibration rows: give --data D.npz")
    try:
        trt, gpu = probe()
    except EngineSkipped as exc:
        print(f"skipped: {exc}; no engine built", file=sys.stderr)
        return SKIPPED_EXIT
    info = build(
        trt, gpu, args.model, args.out, args.precision, calibration=calibration,
        max_batch=args.max_batch, max_seq=args.max_seq,
    )  # fmt: skip
    print(
        f"wrote {args.out}: {args.precision} engine for {gpu.name} (compute capability "
        f"{info.compute_capability}), TensorRT {info.tensorrt_version}, cache key "
        f"{info.cache_key[:16]}"
    )
    return 0


def cmd_package_engine(args: argparse.Namespace) -> int:
    from cloud.pipeline.engine_package import package_engine
    from common.hardware import engine_package_id

    m = package_engine(args.package, args.engine, args.out, arch=args.arch)
    assert m.target.compute_capability and m.target.tensorrt_version  # package_engine set them
    package = engine_package_id(m.target.compute_capability, m.target.tensorrt_version)
    print(f"wrote {args.out}: {m.name} {m.version} engine package {package}; publish it with "
          f"`fogline model publish {args.out}` after the ONNX package")  # fmt: skip
    return 0


def add_package_engine(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "package-engine",
        help="make a publishable engine package from an ONNX package and its built engine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write DIR with the engine (model.plan), the ONNX package's golden data "
        "and an unsigned manifest: the ONNX package's name, version, release and tensors, "
        "format tensorrt, and a target of the engine's compute capability and TensorRT "
        "version. Published beside the version's ONNX package, it is what devices "
        "reporting that GPU and TensorRT get in a rollout; every other device gets ONNX.",
    )
    p.add_argument("--package", type=Path, required=True, help="the ONNX edge package directory")
    p.add_argument("--engine", type=Path, required=True, help="a `build-engine --out` directory")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new package directory")
    p.add_argument("--arch", choices=["any", "x86_64", "aarch64"], default="any",
                   help="CPU architecture the engine is for")  # fmt: skip
    p.set_defaults(func=one_line_errors(cmd_package_engine))


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65536:
        raise argparse.ArgumentTypeError(f"must be within [1, 65536], got {text}")
    return value


def add_build_engine(subparsers: argparse._SubParsersAction) -> None:
    from cloud.pipeline.compress_cli import _existing_file

    p = subparsers.add_parser(
        "build-engine",
        help="build a TensorRT engine from an ONNX model (needs tensorrt and a GPU)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Parse the ONNX model with TensorRT's ONNX parser and build a serialized "
        "fp16 or int8 engine (int8 calibrated on --data rows) into DIR/model.plan, with "
        "DIR/engine.json recording the GPU's compute capability, the TensorRT version and "
        "the engine cache key (model sha256 + precision + compute capability + TensorRT "
        f"version). Exits {SKIPPED_EXIT} with one 'skipped:' line where tensorrt or a CUDA "
        "GPU is absent. Unverified on real hardware (see README).",
    )
    p.add_argument("--model", type=_existing_file, required=True, help="ONNX model")
    p.add_argument("--precision", choices=["fp16", "int8"], required=True, help="engine math")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="engine directory")
    p.add_argument("--data", type=_existing_file, default=None, metavar="D.npz",
                   help="int8 calibration rows, one array per model input")  # fmt: skip
    p.add_argument("--max-batch", type=_positive, default=32, help="largest batch the engine takes")
    p.add_argument("--max-seq", type=_positive, default=128,
                   help="largest size of any other dynamic axis (e.g. tokens)")  # fmt: skip
    p.set_defaults(func=one_line_errors(cmd_build_engine))
