"""What a device runs on, as it reports it, and which package fits it.

An agent reports its hardware in its status (CPU architecture, and where a GPU
with TensorRT is present, the GPU's compute capability and the TensorRT
version). The control plane reads that report through ``parse_hardware`` (the
one door: bounded, plain values, refused whole when anything is off) and picks,
per device, the TensorRT engine package built for exactly that GPU architecture
and TensorRT release, else the ONNX package (``choose_package``). An agent checks
the same rule against its own probe before it downloads an engine
(``engine_misfit``), so a device that claimed hardware it lacks refuses the engine
and keeps serving with ONNX Runtime.

TensorRT refuses a serialized engine built by another major.minor release or for
another compute capability (without hardware-compatibility mode, which Fogline
does not use), so an engine package is keyed by (compute capability, TensorRT
major.minor) and matches only that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidInputError, TargetMismatchError
from common.manifest import Manifest

ONNX_PACKAGE = "onnx"  # the package every device can run: the version's ONNX edge package
TENSORRT = "tensorrt"  # the runtime name an agent lists when it can serve engines
MAX_HARDWARE_KEYS = 16
MAX_GPU_NAME = 128
ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}
_ARCH = re.compile(r"[a-z0-9_]{1,32}")
_SYSTEM = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_COMPUTE_CAPABILITY = re.compile(r"[1-9][0-9]?\.[0-9]{1,2}")  # "8.7", "12.0"
_TRT_VERSION = re.compile(r"[1-9][0-9]?(\.[0-9]{1,4}){1,3}")  # "10.3.0", "8.6.1.6"
_GPU_NAME = re.compile(rf"[A-Za-z0-9 ._()/+-]{{1,{MAX_GPU_NAME}}}")
_KNOWN_KEYS = frozenset(
    {"arch", "system", "accelerator", "gpu", "compute_capability", "tensorrt_version"}
)


@dataclass(frozen=True)
class Hardware:
    arch: str = "unknown"  # x86_64 | aarch64 | ...
    system: str | None = None  # Linux
    accelerator: str = "cpu"  # cpu | cuda
    gpu: str | None = None  # the GPU's name, for people
    compute_capability: str | None = None  # "8.7"
    tensorrt_version: str | None = None  # "10.3.0"

    @property
    def engine_key(self) -> tuple[str, str] | None:
        """(compute capability, TensorRT major.minor), or None without a GPU and TensorRT."""
        if self.accelerator != "cuda" or not (self.compute_capability and self.tensorrt_version):
            return None
        return self.compute_capability, trt_major_minor(self.tensorrt_version)

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def normalize_arch(value: str) -> str:
    arch = value.strip().lower()
    return ARCH_ALIASES.get(arch, arch)


def trt_major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_compute_capability(value: object, what: str = "compute capability") -> str:
    if not isinstance(value, str) or not _COMPUTE_CAPABILITY.fullmatch(value):
        raise InvalidInputError(f"invalid {what} {_shown(value)}: use MAJOR.MINOR, e.g. 8.7")
    return value


def check_trt_version(value: object, what: str = "TensorRT version") -> str:
    if not isinstance(value, str) or not _TRT_VERSION.fullmatch(value):
        raise InvalidInputError(f"invalid {what} {_shown(value)}: use e.g. 10.3.0")
    return value


def parse_hardware(doc: object) -> Hardware:
    """A device's hardware report, checked; InvalidInputError names what was wrong.

    NOTE: refused whole, never half-read: a report with one bad field says nothing
    the control plane may act on, and the device gets the ONNX package.
    """
    if doc is None or doc == {}:
        return Hardware()
    if not isinstance(doc, dict) or len(doc) > MAX_HARDWARE_KEYS:
        raise InvalidInputError(f"hardware must be an object of at most {MAX_HARDWARE_KEYS} keys")
    unknown = sorted(str(k)[:32] for k in doc if k not in _KNOWN_KEYS)
    if unknown:
        raise InvalidInputError(f"hardware has unknown keys {unknown[:4]}")
    arch = doc.get("arch", "unknown")
    if not isinstance(arch, str) or not _ARCH.fullmatch(normalize_arch(arch)):
        raise InvalidInputError(f"invalid hardware arch {_shown(arch)}")
    system = doc.get("system")
    if system is not None and (not isinstance(system, str) or not _SYSTEM.fullmatch(system)):
        raise InvalidInputError(f"invalid hardware system {_shown(system)}")
    accelerator = doc.get("accelerator", "cpu")
    if accelerator not in ("cpu", "cuda"):
        raise InvalidInputError(f"invalid accelerator {_shown(accelerator)}: cpu or cuda")
    gpu = doc.get("gpu")
    if gpu is not None and (not isinstance(gpu, str) or not _GPU_NAME.fullmatch(gpu)):
        raise InvalidInputError(f"invalid GPU name {_shown(gpu)}")
    cc = doc.get("compute_capability")
    trt = doc.get("tensorrt_version")
    return Hardware(
        arch=normalize_arch(arch),
        system=system,
        accelerator=accelerator,
        gpu=gpu,
        compute_capability=None if cc is None else check_compute_capability(cc),
        tensorrt_version=None if trt is None else check_trt_version(trt),
    )


def engine_package_id(compute_capability: str, tensorrt_version: str) -> str:
    """The registry's name for an engine package: ``trt-cc8.7-10.3`` (a safe name)."""
    cc = check_compute_capability(compute_capability)
    return f"trt-cc{cc}-{trt_major_minor(check_trt_version(tensorrt_version))}"


def engine_misfit(
    target_arch: str,
    compute_capability: str | None,
    tensorrt_version: str | None,
    hardware: Hardware,
) -> str | None:
    """Why an engine built for this target cannot run on ``hardware``; None when it can."""
    have = hardware.engine_key
    if compute_capability is None or tensorrt_version is None:
        return "the engine names no compute capability and TensorRT version"
    if have is None:
        return "this device has no CUDA GPU with TensorRT"
    if target_arch not in ("any", hardware.arch):
        return f"the engine is for {target_arch}, this device is {hardware.arch}"
    want = (compute_capability, trt_major_minor(tensorrt_version))
    if want != have:
        return (
            f"the engine is for compute capability {want[0]} with TensorRT {want[1]}, this "
            f"device has compute capability {have[0]} with TensorRT {have[1]}"
        )
    return None


def check_package_fits(m: Manifest, hardware: Hardware, runtimes: tuple[str, ...]) -> None:
    """TargetMismatchError unless this device can run the package ``m``.

    An ONNX package runs anywhere ONNX Runtime does; an engine only on the GPU and
    TensorRT it was built for, and only by an agent with a TensorRT runtime. The agent
    asks its own probe, never the hardware it reported, so a false report (or a forged
    status) gets an engine refused here and the model it serves now keeps serving.
    """
    if m.format != TENSORRT:
        return
    t = m.target
    why = engine_misfit(t.arch, t.compute_capability, t.tensorrt_version, hardware)
    if why is None and TENSORRT not in runtimes:
        why = "this agent has no TensorRT runtime"
    if why is not None:
        raise TargetMismatchError(
            f"refused the TensorRT engine of {m.name} {m.version}: {why}; "
            "still serving with ONNX Runtime"
        )


def choose_package(
    hardware: Hardware | None,
    runtimes: list[str],
    engines: dict[tuple[str, str], str],
) -> str:
    """The package id a device gets: the engine for its exact (compute capability,
    TensorRT major.minor) when it can serve engines and one exists, else ``onnx``.

    ``engines``: (compute capability, TensorRT major.minor) -> package id.
    """
    if hardware is None or TENSORRT not in runtimes:
        return ONNX_PACKAGE
    key = hardware.engine_key
    if key is None:
        return ONNX_PACKAGE
    return engines.get(key, ONNX_PACKAGE)


def parse_runtimes(value: object) -> list[str]:
    """The runtimes a status lists, plain short names only (anything else: none)."""
    if not isinstance(value, list) or len(value) > MAX_HARDWARE_KEYS:
        return []
    return [v for v in value if isinstance(v, str) and _SYSTEM.fullmatch(v)]


def _shown(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else type(value).__name__
