"""This device's hardware, probed once at start: CPU architecture, and a CUDA GPU with
TensorRT where both are present.

The agent reports the probe in its status (the control plane picks its package from
it) and checks every engine package against it before downloading one
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

from common.errors import InvalidInputError
from common.hardware import Hardware, normalize_arch, parse_hardware

logger = logging.getLogger(__name__)

# The runtimes this agent serves packages with. NOTE: no TensorRT runtime yet, so the
# control plane sends this agent ONNX packages even on a GPU (common.hardware).
RUNTIMES: tuple[str, ...] = ("onnxruntime",)
NVIDIA_SMI_TIMEOUT_S = 5.0


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
