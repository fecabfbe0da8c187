"""TensorRT backend of the runtime interface: serves an engine package's ``model.plan``.

Written against the TensorRT 10 Python API (``deserialize_cuda_engine``, named I/O
tensors, ``execute_async_v3``) with GPU memory and copies through cuda-python, never
torch (a device has none). Both are imported lazily, when a runtime loads, so every
edge module still imports on a host without them.

NOTE: UNVERIFIED on real hardware: the machines this was written on have no GPU and
no TensorRT. The tests run it against stand-ins (``tests/edge/test_tensorrt_runtime``)
whose "engine" is an ONNX model run by ONNX Runtime; every CUDA call goes through
``Cuda`` so that a stand-in can take its place.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import (
    EngineLoadError,
    InvalidInputError,
    ModelNotReadyError,
    RuntimeUnavailableError,
)
from common.inference import V2_TO_NUMPY, InferRequest, InferResponse, Tensor
from common.manifest import Manifest
from common.onnx_runtime import check_inputs
from common.runtime import ModelInfo, answer_locally
from common.serving_metrics import ServingMetrics

logger = logging.getLogger(__name__)


class Cuda(Protocol):
    """The CUDA calls the runtime makes; pointers and streams are plain ints."""

    def device_count(self) -> int: ...

    def allocate(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def create_stream(self) -> int: ...

    def destroy_stream(self, stream: int) -> None: ...

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None: ...

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None: ...

    def synchronize(self, stream: int) -> None: ...


class CudaRuntimeApi:
    """``Cuda`` over cuda-python's runtime API (``cudart``): every call's error checked."""

    def __init__(self, cudart: Any) -> None:
        self._rt = cudart

    def _call(self, result: tuple[Any, ...]) -> Any:
        err, *rest = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeUnavailableError(f"CUDA error {getattr(err, 'name', err)}")
        return rest[0] if rest else None

    def device_count(self) -> int:
        return int(self._call(self._rt.cudaGetDeviceCount()))

    def allocate(self, nbytes: int) -> int:
        return int(self._call(self._rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._call(self._rt.cudaFree(ptr))

    def create_stream(self) -> int:
        return int(self._call(self._rt.cudaStreamCreate()))

    def destroy_stream(self, stream: int) -> None:
        self._call(self._rt.cudaStreamDestroy(stream))

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))

    def synchronize(self, stream: int) -> None:
        self._call(self._rt.cudaStreamSynchronize(stream))


@dataclass(frozen=True)
class TensorRtLibs:
    """The ``tensorrt`` module (or a stand-in) and the CUDA calls beside it."""

    trt: Any
    cuda: Cuda


def load_tensorrt_libs() -> TensorRtLibs:
    """TensorRT and the CUDA bindings; RuntimeUnavailableError when either is missing."""
    try:
        # NOTE: the one tensorrt import in edge/, lazy on purpose: DESIGN.md puts the
        # TensorRT backend in the agent ("TensorRT where present"), and every edge
        # module still imports on a device without it (tests/test_boundaries.py checks
        # both: lazy in this place only, and a device import with tensorrt blocked).
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the package without its libraries
        raise RuntimeUnavailableError(f"TensorRT is not installed here: {exc}") from exc
    return TensorRtLibs(trt, CudaRuntimeApi(_import_cudart()))


def _import_cudart() -> Any:
    try:  # cuda-python 12.6+ moved the runtime API here
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"the CUDA Python bindings (cuda-python) are not installed here: {exc}"
            ) from exc
    return runtime


class _DeviceMemory:
    """The runtime's stream and device buffers, one per tensor name, grown on demand.

    Separate from the runtime so that a finalizer can free them once the last request
    lets go of a runtime that was replaced without ``unload`` (``ModelServing.activate``).
    """

    def __init__(self, cuda: Cuda) -> None:
        self.cuda = cuda
        self.stream = cuda.create_stream()
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.closed = False

    def buffer(self, name: str, nbytes: int) -> int:
        nbytes = max(nbytes, 1)
        held = self.buffers.get(name)
        if held is not None and held[1] >= nbytes:
            return held[0]
        if held is not None:  # NOTE: safe: every infer ends with a synchronize
            self.cuda.free(held[0])
            del self.buffers[name]
        ptr = self.cuda.allocate(nbytes)
        self.buffers[name] = (ptr, nbytes)
        return ptr

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ptr, _ in self.buffers.values():
            self.cuda.free(ptr)
        self.buffers.clear()
        self.cuda.destroy_stream(self.stream)


@dataclass
class _Loaded:
    runtime: Any  # NOTE: kept: the engine must not outlive the trt.Runtime that made it
    engine: Any
    context: Any
    outputs: dict[str, np.dtype[Any]]  # every engine output (each needs an address)
    memory: _DeviceMemory


class TensorRtRuntime:
    """Serves one serialized TensorRT engine described by a manifest.

    One execution context, so runs are serialised by a lock; they run in a worker
    thread (``execute_async_v3`` plus the copies block until the stream is done).
    """

    platform = "tensorrt_plan"  # Triton's name for the same kind of model

    def __init__(
        self, engine_path: Path, manifest: Manifest, *, libs: TensorRtLibs | None = None
    ) -> None:
        """``libs``: None loads the real TensorRT and cuda-python at ``load``."""
        self.engine_path = engine_path
        self.manifest = manifest
        self.metrics: ServingMetrics | None = None
        self._libs = libs
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    @property
    def info(self) -> ModelInfo:
        m = self.manifest
        return ModelInfo(
            name=m.name,
            version=m.version,
            platform=self.platform,
            inputs=m.inputs,
            outputs=m.outputs,
            parameters={"fogline.variant": m.variant, "fogline.precision": m.precision},
        )

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    async def load(self) -> None:
        if self._loaded is None:
            self._loaded = await asyncio.to_thread(self._open)
            m = self.manifest
            logger.info("loaded TensorRT engine %s %s from %s", m.name, m.version, self.engine_path)

    def _open(self) -> _Loaded:
        libs = self._libs or load_tensorrt_libs()
        if libs.cuda.device_count() < 1:
            raise RuntimeUnavailableError("no CUDA GPU found for the TensorRT engine")
        trt = libs.trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise EngineLoadError(
                f"{self.engine_path.name} did not deserialize: not a TensorRT engine, or one "
                "built by another TensorRT release or for another GPU"
            )
        outputs = self._check_tensors(trt, engine)
        context = engine.create_execution_context()
        if context is None:
            raise EngineLoadError(f"{self.engine_path.name}: no execution context (GPU memory?)")
        memory = _DeviceMemory(libs.cuda)
        loaded = _Loaded(runtime, engine, context, outputs, memory)
        # Frees the GPU buffers of a runtime dropped without unload; not at exit (CUDA
        # may be torn down by then, and the process's memory goes with it anyway).
        weakref.finalize(loaded, memory.close).atexit = False
        return loaded

    def _check_tensors(self, trt: Any, engine: Any) -> dict[str, np.dtype[Any]]:
        """The engine's outputs' dtypes; EngineLoadError unless its tensors are the manifest's."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        declared = {s.name for s in self.manifest.inputs}
        if inputs != declared:
            raise EngineLoadError(
                f"{self.engine_path.name}: manifest inputs {sorted(declared)} "
                f"but the engine has {sorted(inputs)}"
            )
        for spec in (*self.manifest.inputs, *self.manifest.outputs):
            want = np.dtype(V2_TO_NUMPY[spec.datatype])
            if spec.name not in dtypes or dtypes[spec.name] != want:
                got = dtypes.get(spec.name, "no such tensor")
                raise EngineLoadError(
                    f"{self.engine_path.name}: {spec.name!r} is {got}, not {want}"
                )
        return {n: dtypes[n] for n in names if n not in inputs}

    def infer_sync(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> list[Tensor]:
        """Run checked feeds (``check_inputs``); blocking."""
        names = outputs or [o.name for o in self.manifest.outputs]
        with self._lock:
            loaded = self._loaded
            if loaded is None:
                raise ModelNotReadyError(f"model {self.manifest.name!r} is not loaded")
            results = self._run(loaded, self._checked(feeds))
        return [Tensor(n, results[n]) for n in names]

    def _checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds as the engine takes them; the self-test's golden inputs come here unchecked."""
        out = {}
        for spec in self.manifest.inputs:
            array = feeds.get(spec.name)
            want = np.dtype(V2_TO_NUMPY[spec.datatype])
            if array is None or array.dtype != want or array.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"input {spec.name!r} must be {want} of rank {len(spec.shape)}"
                )
            out[spec.name] = np.ascontiguousarray(array)
        return out

    def _run(self, loaded: _Loaded, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, memory = loaded.context, loaded.memory
        cuda, stream = memory.cuda, memory.stream
        for name, array in feeds.items():
            if not context.set_input_shape(name, tuple(array.shape)):
                raise InvalidInputError(
                    f"input {name!r} of shape {list(array.shape)} is outside the engine's profile"
                )
            ptr = memory.buffer(name, array.nbytes)
            cuda.to_device(ptr, array, stream)
            context.set_tensor_address(name, ptr)
        hosts: dict[str, tuple[np.ndarray, int]] = {}
        for name, dtype in loaded.outputs.items():
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InvalidInputError(f"output {name!r} has no shape for these inputs: {shape}")
            host = np.empty(shape, dtype=dtype)
            ptr = memory.buffer(name, host.nbytes)
            context.set_tensor_address(name, ptr)
            hosts[name] = (host, ptr)
        if not context.execute_async_v3(stream):
            cuda.synchronize(stream)
            raise RuntimeUnavailableError(f"TensorRT could not run {self.manifest.name!r}")
        for host, ptr in hosts.values():
            cuda.to_host(host, ptr, stream)
        cuda.synchronize(stream)
        return {name: host for name, (host, _) in hosts.items()}

    async def infer(self, request: InferRequest) -> InferResponse:
        feeds = check_inputs(request, self.manifest.inputs)  # wrong name, dtype, shape: 400

        async def run() -> list[Tensor]:
            return await asyncio.to_thread(self.infer_sync, feeds, request.outputs)

        return await answer_locally(self, request, feeds, run)

    async def unload(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:  # NOTE: waits for a run in progress: its buffers are in use
            loaded, self._loaded = self._loaded, None
            if loaded is not None:
                loaded.memory.close()
