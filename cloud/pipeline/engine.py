"""TensorRT engines built from an ONNX model, keyed to the GPU and TensorRT that built them.

A serialized engine only runs on the GPU architecture (compute capability)
and TensorRT version it was built with, so each build writes ``engine.json``
beside ``model.plan`` with both, and a cache key made of the model's sha256,
the precision, the compute capability and the TensorRT version. The package
step reads ``engine.json``; an agent picks an engine only if ``matches`` its GPU.

NOTE: UNVERIFIED on real hardware. The TensorRT libraries cannot be installed
on the machines this was written on (only the bindings are on the index), so
``build`` follows the documented tensorrt Python API (builder, ONNX parser,
builder config flags, an IInt8EntropyCalibrator2, build_serialized_network)
and is exercised only against a stand-in in the tests. Where tensorrt or a
GPU is absent, ``probe`` says so and the command skips cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from common.errors import FoglineError, InvalidInputError
from common.hardware import Hardware, engine_misfit
from common.manifest import sha256_file
from common.onnx_runtime import describe_onnx_io

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
ENGINE_FILE = "model.plan"
ENGINE_INFO_FILE = "engine.json"
WORKSPACE_BYTES = 1 << 30


class EngineSkipped(FoglineError, RuntimeError):
    """No engine can be built here (no tensorrt, no GPU); not the operator's mistake."""


class EngineBuildError(FoglineError, RuntimeError):
    """TensorRT refused the model (parser or builder errors)."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "8.6"


@dataclass(frozen=True)
class EngineInfo:
    """What ``engine.json`` holds: enough to decide whether an engine fits a device."""

    model_sha256: str
    precision: str
    compute_capability: str
    tensorrt_version: str
    gpu_name: str
    cache_key: str
    engine_sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def cache_key(model_sha256: str, precision: str, compute_capability: str, trt_version: str) -> str:
    """One engine per (model, precision, GPU architecture, TensorRT version)."""
    text = "\n".join([model_sha256, precision, compute_capability, trt_version])
    return hashlib.sha256(text.encode()).hexdigest()


def matches(info: EngineInfo, gpu: Gpu, trt_version: str) -> bool:
    """Whether an engine built as ``info`` can be deserialized on ``gpu`` with ``trt_version``.

    TensorRT refuses engines from another major.minor version and another compute
    capability (without hardware compatibility mode, which Fogline does not use). The
    one rule is ``common.hardware.engine_misfit``: rollouts and agents use it too.
    """
    device = Hardware(
        accelerator="cuda", compute_capability=gpu.compute_capability, tensorrt_version=trt_version
    )
    why = engine_misfit("any", info.compute_capability, info.tensorrt_version, device)
    return why is None


def cuda_gpu() -> Gpu | None:
    """The first CUDA GPU as torch sees it, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return Gpu(torch.cuda.get_device_name(0), f"{major}.{minor}")


def probe(
    import_trt: Callable[[], ModuleType] | None = None,
    find_gpu: Callable[[], Gpu | None] = cuda_gpu,
) -> tuple[ModuleType, Gpu]:
    """(tensorrt module, GPU), or ``EngineSkipped`` saying which one is missing."""
    try:
        trt = import_trt() if import_trt else __import__("tensorrt")
    except ImportError as exc:
        raise EngineSkipped(
            f"tensorrt is not importable ({exc}); TensorRT engines need the tensorrt "
            "package with its CUDA libraries and an NVIDIA GPU"
        ) from exc
    gpu = find_gpu()
    if gpu is None:
        raise EngineSkipped("no CUDA GPU is visible; TensorRT engines are built on the GPU")
    return trt, gpu


def _profile_shapes(
    spec_shape: list[int], max_batch: int, max_seq: int
) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) for one input: batch axis 1..max_batch, other dynamic axes 1..max_seq."""
    ranges = []
    for axis, d in enumerate(spec_shape):
        if d != -1:
            ranges.append((d, d, d))
        elif axis == 0:
            ranges.append((1, max(1, max_batch // 2), max_batch))
        else:
            ranges.append((1, max_seq, max_seq))
    lo, opt, hi = ([r[i] for r in ranges] for i in range(3))
    return lo, opt, hi


def _calibrator(trt: ModuleType, feeds: dict[str, np.ndarray], batch: int, cache: Path) -> Any:
    """An entropy calibrator feeding ``feeds`` through device buffers (torch CUDA tensors)."""
    import torch

    rows = len(next(iter(feeds.values())))

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self._starts = iter(range(0, rows - batch + 1, batch))
            self._held: list[Any] = []

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            start = next(self._starts, None)
            if start is None:
                return None
            self._held = [torch.from_numpy(feeds[n][start : start + batch]).cuda() for n in names]
            return [int(t.data_ptr()) for t in self._held]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: bytes) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def build(
    trt: ModuleType,
    gpu: Gpu,
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    *,
    calibration: dict[str, np.ndarray] | None = None,
    max_batch: int = 32,
    max_seq: int = 128,
) -> EngineInfo:
    """Parse ``onnx_path``, build a ``precision`` engine, write it and ``engine.json``."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "int8" and not calibration:
        raise InvalidInputError("an int8 engine needs calibration rows (--data D.npz)")
    specs, _ = describe_onnx_io(onnx_path)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for spec in specs:
        profile.set_shape(spec.name, *_profile_shapes(spec.shape, max_batch, max_seq))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)  # int8 engines fall back to fp16, not fp32
    out_dir.mkdir(parents=True, exist_ok=True)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        config.int8_calibrator = _calibrator(
            trt, calibration or {}, min(max_batch, 8), out_dir / "calibration.cache"
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build a {precision} engine for {onnx_path}")
    return _write(out_dir, bytes(serialized), onnx_path, precision, gpu, str(trt.__version__))


def _write(
    out_dir: Path, plan: bytes, onnx_path: Path, precision: str, gpu: Gpu, version: str
) -> EngineInfo:
    engine = out_dir / ENGINE_FILE
    engine.write_bytes(plan)
    model_sha = sha256_file(Path(onnx_path))
    info = EngineInfo(
        model_sha256=model_sha,
        precision=precision,
        compute_capability=gpu.compute_capability,
        tensorrt_version=version,
        gpu_name=gpu.name,
        cache_key=cache_key(model_sha, precision, gpu.compute_capability, version),
        engine_sha256=sha256_file(engine),
    )
    tmp = out_dir / f".{ENGINE_INFO_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / ENGINE_INFO_FILE)
    logger.info("built %s engine %s (%d bytes)", precision, engine, len(plan))
    return info


def read_info(out_dir: Path) -> EngineInfo:
    """The ``engine.json`` of a built engine directory."""
    path = Path(out_dir) / ENGINE_INFO_FILE
    try:
        return EngineInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}") from exc
