"""The agent's TensorRT runtime, against stand-ins with real ONNX Runtime inside.

TensorRT and a GPU cannot be had on these machines, so ``StandInTensorRT`` and
``StandInCuda`` take the places of the ``tensorrt`` module and the CUDA calls. They
are stand-ins, not mocks of the runtime: the "engine" bytes are a real ONNX model that
the stand-in runs with ONNX Runtime, and device memory is real host memory that the
runtime must copy its inputs into and its outputs out of, so the answers are real and
a wrong address, size or shape shows up as a wrong answer. What the stand-ins cannot
prove is that real TensorRT and cuda-python behave as they do: see
``test_real_tensorrt_engine_matches_onnx_runtime``, which runs only where both exist.
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from common import golden
from common.errors import EngineLoadError, InvalidInputError, RuntimeUnavailableError
from common.inference import InferRequest, Tensor
from common.manifest import Manifest, Target, file_entry
from common.onnx_runtime import OnnxRuntime
from edge.hardware import probe_runtimes
from edge.local_runtime import open_runtime
from edge.tensorrt_runtime import TensorRtLibs, TensorRtRuntime, load_tensorrt_libs
from tests.model_fixtures import CLASSES, IN_FEATURES, make_package, reference_output, toy_input

MAX_BATCH = 8  # the stand-in engine's optimization profile: batch 1..8


class StandInCuda:
    """Stand-in for the CUDA calls: "device" buffers are host arrays, counted."""

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.memory: dict[int, np.ndarray] = {}  # pointer -> bytes
        self.streams: set[int] = set()
        self.allocations = 0
        self._next = 0x1000

    def device_count(self) -> int:
        return self.devices

    def allocate(self, nbytes: int) -> int:
        self._next += 0x1000 + nbytes
        self.memory[self._next] = np.zeros(nbytes, dtype=np.uint8)
        self.allocations += 1
        return self._next

    def free(self, ptr: int) -> None:
        del self.memory[ptr]  # KeyError on a double free

    def create_stream(self) -> int:
        stream = len(self.streams) + 1
        self.streams.add(stream)
        return stream

    def destroy_stream(self, stream: int) -> None:
        self.streams.remove(stream)

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        assert stream in self.streams
        self.memory[ptr][: host.nbytes] = host.reshape(-1).view(np.uint8)

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        assert stream in self.streams
        host.reshape(-1).view(np.uint8)[:] = self.memory[ptr][: host.nbytes]

    def synchronize(self, stream: int) -> None:
        assert stream in self.streams

    def read(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        count = int(np.prod(shape)) * dtype.itemsize
        return self.memory[ptr][:count].view(dtype).reshape(shape).copy()


class _StandInContext:
    """An execution context: shapes and addresses as TensorRT takes them; runs with ORT."""

    def __init__(self, engine: _StandInEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape_calls.append((name, tuple(shape)))
        want = self.engine.io[name][1]
        fits = len(shape) == len(want) and 1 <= shape[0] <= MAX_BATCH
        if fits and all(w in (-1, s) for w, s in zip(want, shape, strict=True)):
            self.shapes[name] = tuple(shape)
            return True
        return False  # as TensorRT does for a shape outside the profile

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch = next(iter(self.shapes.values()), (-1,))[0]
        return tuple(batch if d == -1 else d for d in self.engine.io[name][1])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        cuda, session = self.engine.cuda, self.engine.session
        feeds = {
            i.name: cuda.read(self.addresses[i.name], self.shapes[i.name], self.engine.dtype(i))
            for i in session.get_inputs()
        }
        names = [o.name for o in session.get_outputs()]
        for name, out in zip(names, session.run(names, feeds), strict=True):
            cuda.to_device(self.addresses[name], np.ascontiguousarray(out), stream)
        return True


class _StandInEngine:
    def __init__(self, session: Any, cuda: StandInCuda) -> None:
        self.session, self.cuda = session, cuda
        self.io: dict[str, tuple[str, list[int]]] = {}
        for mode, args in (("INPUT", session.get_inputs()), ("OUTPUT", session.get_outputs())):
            for a in args:
                self.io[a.name] = (mode, [d if isinstance(d, int) else -1 for d in a.shape])
        self.contexts: list[_StandInContext] = []

    @staticmethod
    def dtype(arg: Any) -> np.dtype[Any]:
        return np.dtype({"tensor(float)": np.float32, "tensor(int64)": np.int64}[arg.type])

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> np.dtype[Any]:
        args = [*self.session.get_inputs(), *self.session.get_outputs()]
        return self.dtype(next(a for a in args if a.name == name))

    def create_execution_context(self) -> _StandInContext:
        self.contexts.append(_StandInContext(self))
        return self.contexts[-1]


class StandInTensorRT:
    """Stand-in for the ``tensorrt`` module (10.x API names): an "engine" is ONNX bytes.

    ``deserializes=False``: ``deserialize_cuda_engine`` returns None, as TensorRT does
    for an engine from another release or GPU.
    """

    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    def __init__(self, cuda: StandInCuda, *, deserializes: bool = True) -> None:
        self.cuda, self.deserializes = cuda, deserializes
        self.engines: list[_StandInEngine] = []
        outer = self

        class Runtime:
            def __init__(self, logger: StandInTensorRT.Logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> _StandInEngine | None:
                if not outer.deserializes:
                    return None
                import onnxruntime as ort

                session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                outer.engines.append(_StandInEngine(session, outer.cuda))
                return outer.engines[-1]

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype: np.dtype[Any]) -> type:
        return dtype.type


def stand_ins(devices: int = 1, deserializes: bool = True) -> TensorRtLibs:
    cuda = StandInCuda(devices)
    return TensorRtLibs(StandInTensorRT(cuda, deserializes=deserializes), cuda)


def engine_package(tmp_path: Path) -> tuple[Path, Manifest, Path]:
    """(engine file, its manifest, the ONNX model it holds): the toy as an engine package."""
    pkg = make_package(tmp_path / "onnx")
    plan = tmp_path / "model.plan"
    plan.write_bytes(pkg.model_path.read_bytes())  # the stand-in's "engine"
    (tmp_path / golden.GOLDEN_FILE).write_bytes((pkg.directory / golden.GOLDEN_FILE).read_bytes())
    manifest = replace(
        pkg.manifest,
        format="tensorrt",
        files=[file_entry(plan, "model"), file_entry(tmp_path / golden.GOLDEN_FILE, "golden")],
        target=Target("any", "cuda", "10.3.0", "8.7"),
        chunks=None,
    )
    return plan, manifest, pkg.model_path


def request(x: np.ndarray) -> InferRequest:
    return InferRequest(model="toy", inputs=[Tensor("input", x)])


async def test_infer_equals_onnx_runtime_on_the_same_model(tmp_path: Path) -> None:
    plan, manifest, onnx_path = engine_package(tmp_path)
    runtime = TensorRtRuntime(plan, manifest, libs=stand_ins())
    await runtime.load()
    assert runtime.ready and runtime.info.platform == "tensorrt_plan"
    x = toy_input(3)
    response = await runtime.infer(request(x))
    [out] = response.outputs
    assert out.name == "probabilities" and out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, reference_output(onnx_path, x), rtol=1e-6, atol=1e-7)
    # The golden self-test the agent runs before activating a slot passes too.
    await golden.self_test(runtime, tmp_path, manifest)


async def test_dynamic_batch_sets_the_input_shape_and_grows_buffers(tmp_path: Path) -> None:
    plan, manifest, onnx_path = engine_package(tmp_path)
    libs = stand_ins()
    runtime = TensorRtRuntime(plan, manifest, libs=libs)
    await runtime.load()
    for rows in (1, 5, 2):
        x = toy_input(rows, seed=rows)
        [out] = (await runtime.infer(request(x))).outputs
        assert out.data.shape == (rows, CLASSES)
        np.testing.assert_allclose(out.data, reference_output(onnx_path, x), atol=1e-6)
    context = libs.trt.engines[0].contexts[0]
    assert context.shape_calls == [("input", (r, IN_FEATURES)) for r in (1, 5, 2)]
    # One input and one output buffer, each reallocated once when 5 rows came after 1.
    assert libs.cuda.allocations == 4 and len(libs.cuda.memory) == 2


async def test_wrong_shape_or_dtype_is_a_clear_error_and_serving_goes_on(tmp_path: Path) -> None:
    plan, manifest, onnx_path = engine_package(tmp_path)
    runtime = TensorRtRuntime(plan, manifest, libs=stand_ins())
    await runtime.load()
    x = toy_input(2)
    with pytest.raises(InvalidInputError, match="shape"):
        await runtime.infer(request(x[:, :-1]))
    with pytest.raises(InvalidInputError, match="FP32"):
        await runtime.infer(request(x.astype(np.int32)))
    with pytest.raises(InvalidInputError, match="profile"):  # more rows than the engine takes
        await runtime.infer(request(toy_input(MAX_BATCH + 1)))
    with pytest.raises(InvalidInputError, match="float32"):  # the self-test's unchecked path
        runtime.infer_sync({"input": x.astype(np.float64)}, None)
    [out] = (await runtime.infer(request(x))).outputs
    np.testing.assert_allclose(out.data, reference_output(onnx_path, x), atol=1e-6)


async def test_an_engine_that_does_not_deserialize_is_a_clear_error(tmp_path: Path) -> None:
    plan, manifest, _ = engine_package(tmp_path)
    libs = stand_ins(deserializes=False)
    runtime = TensorRtRuntime(plan, manifest, libs=libs)
    with pytest.raises(EngineLoadError, match="did not deserialize"):
        await runtime.load()
    assert not runtime.ready and not libs.cuda.memory and not libs.cuda.streams


async def test_an_engine_whose_tensors_are_not_the_manifests_is_refused(tmp_path: Path) -> None:
    plan, manifest, _ = engine_package(tmp_path)
    renamed = replace(manifest, inputs=[replace(manifest.inputs[0], name="pixels")])
    with pytest.raises(EngineLoadError, match="pixels"):
        await TensorRtRuntime(plan, renamed, libs=stand_ins()).load()
    retyped = replace(manifest, outputs=[replace(manifest.outputs[0], datatype="FP16")])
    with pytest.raises(EngineLoadError, match="float16"):
        await TensorRtRuntime(plan, retyped, libs=stand_ins()).load()


async def _served_once(tmp_path: Path) -> tuple[TensorRtRuntime, TensorRtLibs]:
    """A loaded runtime that has answered one request (so its buffers exist)."""
    plan, manifest, _ = engine_package(tmp_path)
    libs = stand_ins()
    runtime = TensorRtRuntime(plan, manifest, libs=libs)
    await runtime.load()
    await runtime.infer(request(toy_input(4)))
    return runtime, libs


async def test_unload_frees_the_device_buffers_and_stream(tmp_path: Path) -> None:
    runtime, libs = await _served_once(tmp_path)
    assert len(libs.cuda.memory) == 2 and len(libs.cuda.streams) == 1
    await runtime.unload()
    assert not libs.cuda.memory and not libs.cuda.streams and not runtime.ready
    await runtime.unload()  # twice: nothing freed twice (StandInCuda raises on that)


async def test_a_runtime_dropped_without_unload_frees_its_buffers(tmp_path: Path) -> None:
    # ModelServing.activate replaces a runtime without unloading it (requests may hold it).
    runtime, libs = await _served_once(tmp_path)
    assert libs.cuda.memory
    del runtime
    gc.collect()
    assert not libs.cuda.memory and not libs.cuda.streams


def test_runtimes_are_onnx_only_without_tensorrt() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: this test is for hosts without it")
    assert probe_runtimes() == ("onnxruntime",)  # the real probe, on this host
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed"):
        load_tensorrt_libs()


def test_runtimes_include_tensorrt_only_with_tensorrt_cuda_and_a_gpu() -> None:
    assert probe_runtimes(lambda: stand_ins()) == ("onnxruntime", "tensorrt")
    assert probe_runtimes(lambda: stand_ins(devices=0)) == ("onnxruntime",)

    def no_cuda() -> TensorRtLibs:
        raise RuntimeUnavailableError("the CUDA Python bindings are not installed here")

    assert probe_runtimes(no_cuda) == ("onnxruntime",)


async def test_the_agent_dispatch_picks_the_runtime_by_package_format(tmp_path: Path) -> None:
    plan, manifest, onnx_path = engine_package(tmp_path)
    engine = open_runtime(plan, manifest, tensorrt=stand_ins())
    assert isinstance(engine, TensorRtRuntime)
    await engine.load()
    await golden.self_test(engine, tmp_path, manifest)  # as the Deployer does before activating
    onnx_manifest = make_package(tmp_path / "onnx").manifest
    onnx = open_runtime(onnx_path, onnx_manifest, tensorrt=stand_ins())
    assert isinstance(onnx, OnnxRuntime)
    with pytest.raises(InvalidInputError, match="format"):
        open_runtime(onnx_path, replace(onnx_manifest, format="coreml"))


async def test_an_engine_on_a_host_without_tensorrt_fails_to_load_clearly(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: this test is for hosts without it")
    plan, manifest, _ = engine_package(tmp_path)
    runtime = open_runtime(plan, manifest)  # the real libraries, as the agent has them
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed"):
        await runtime.load()
    assert not runtime.ready


@pytest.mark.gpu
async def test_real_tensorrt_engine_matches_onnx_runtime(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this host")
    if probe_runtimes() != ("onnxruntime", "tensorrt"):
        pytest.skip("TensorRT imports but cuda-python or a CUDA GPU is missing")
    pkg = make_package(tmp_path / "onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(pkg.model_path.read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, IN_FEATURES), (4, IN_FEATURES), (16, IN_FEATURES))
    config.add_optimization_profile(profile)
    plan = tmp_path / "model.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    manifest = replace(pkg.manifest, format="tensorrt")
    runtime = TensorRtRuntime(plan, manifest)  # real TensorRT, real cuda-python
    await runtime.load()
    try:
        for rows in (1, 7):
            x = toy_input(rows)
            [out] = (await runtime.infer(request(x))).outputs
            np.testing.assert_allclose(out.data, reference_output(pkg.model_path, x), atol=1e-4)
    finally:
        await runtime.unload()
