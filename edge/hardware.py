"""This device's hardware, probed once at start: CPU architecture, and a CUDA GPU with
TensorRT where both are present.

The agent reports the probe in its status, with the runtimes it can serve
(``probe_runtimes``); the control plane picks its package from both, and the agent
checks every engine package against them before downloading one
(``common.hardware.check_package_fits``).

NOTE: the GPU side is UNVERIFIED on real hardware here (no NVIDIA GPU or TensorRT
on the machines this was written on). It asks ``nvidia-smi`` for the compute
capability (drivers since 510 answer ``compute_cap``) and the installed
``tensorrt`` package for its version; where either is missing the device is a
plain CPU device and gets ONNX packages, which is always safe.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import subprocess
from collections.abc import Callable

from common.errors import FoglineError, InvalidInputError
from common.hardware import TENSORRT, Hardware, normalize_arch, parse_hardware
from edge.tensorrt_runtime import TensorRtLibs, load_tensorrt_libs

logger = logging.getLogger(__name__)

ONNX_RUNTIME = "onnxruntime"
ONNX_ONLY: tuple[str, ...] = (ONNX_RUNTIME,)
NVIDIA_SMI_TIMEOUT_S = 5.0


def probe_runtimes(
    load_tensorrt: Callable[[], TensorRtLibs] = load_tensorrt_libs,
) -> tuple[str, ...]:
    """The runtimes this host can really serve packages with; blocking (loads TensorRT
    and CUDA): call it once at start, off the event loop.

    TensorRT only when it and the CUDA bindings import and a GPU is found; otherwise
    ONNX Runtime alone, so the control plane keeps sending this device ONNX packages
    (``common.hardware.choose_package``) and the agent refuses engines.
    """
    try:
        gpus = load_tensorrt().cuda.device_count()
    except FoglineError as exc:
        logger.info("no TensorRT runtime (%s): serving ONNX packages only", exc)
        return ONNX_ONLY
    if gpus < 1:
        logger.info("no TensorRT runtime (no CUDA GPU found): serving ONNX packages only")
        return ONNX_ONLY
    return (ONNX_RUNTIME, TENSORRT)


def probe_hardware() -> Hardware:
    """What this host has; blocking (runs ``nvidia-smi``): call it off the event loop."""
    doc: dict[str, str] = {"arch": normalize_arch(platform.machine()), "system": platform.system()}
    trt = _tensorrt_version()
    gpu = _cuda_gpu()
    if trt and gpu:
        doc.update(accelerator="cuda", gpu=gpu[0], compute_capability=gpu[1], tensorrt_version=trt)
    for fields in (doc, {"arch": doc["arch"]}):
        try:
            return parse_hardware(fields)
        except InvalidInputError as exc:  # an odd GPU name or arch: report less
            logger.warning("hardware probe gave %s; reporting less", exc)
    return Hardware()


def _tensorrt_version() -> str | None:
    """The installed TensorRT's version, from its package metadata (no CUDA load)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cuda_gpu() -> tuple[str, str] | None:
    """(name, compute capability) of the first GPU ``nvidia-smi`` lists, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("nvidia-smi gave no GPU: %s", exc)
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, cc = first.rpartition(",")
    return (name.strip(), cc.strip()) if name and cc else None
