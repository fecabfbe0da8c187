"""TensorRT engines: cache key, target matching, the skip, and the build steps.

TensorRT cannot be installed here (no libraries, no GPU), so ``build`` runs
against ``FakeTensorRT``: a stand-in that records the tensorrt API calls it
receives and returns a fixed blob as the serialized engine. It proves the
order and arguments of the calls and what is written, NOT that a real
TensorRT accepts them (see the README: unverified on hardware).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from cloud.pipeline.engine import (
    ENGINE_FILE,
    EngineBuildError,
    EngineSkipped,
    Gpu,
    build,
    cache_key,
    matches,
    probe,
    read_info,
)
from common.errors import InvalidInputError
from common.manifest import sha256_file
from tests.fogline_cli import fogline
from tests.model_fixtures import onnx_model_bytes

GPU = Gpu("NVIDIA H100", "9.0")


class FakeTensorRT:
    """A stand-in for the ``tensorrt`` module: records calls, builds nothing."""

    __version__ = "10.3.0"

    def __init__(self, *, parses: bool = True, builds: bool = True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parses, self.builds = parses, builds
        fake = self
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        self.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8")
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {})

        class Config:
            int8_calibrator: Any = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile: Any) -> None:
                fake.calls.append(("profile", dict(profile.shapes)))

            def set_flag(self, flag: str) -> None:
                fake.calls.append(("flag", flag))

            def set_calibration_profile(self, profile: Any) -> None:
                fake.calls.append(("calibration_profile",))

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[list[int], ...]] = {}

            def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger: Any) -> None:
                self.config = Config()

            def create_network(self, flags: int) -> str:
                fake.calls.append(("network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return self.config

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: str, config: Config) -> bytes | None:
                fake.calls.append(("build", config.int8_calibrator is not None))
                return b"PLAN" if fake.builds else None

        class OnnxParser:
            num_errors = 1

            def __init__(self, network: str, logger: Any) -> None:
                pass

            def parse(self, blob: bytes) -> bool:
                fake.calls.append(("parse", len(blob)))
                return fake.parses

            def get_error(self, i: int) -> str:
                return "Unsupported operator FooBar"

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_model_bytes())
    return path


def test_cache_key_changes_with_each_part() -> None:
    base = cache_key("a" * 64, "fp16", "9.0", "10.3.0")
    assert base == cache_key("a" * 64, "fp16", "9.0", "10.3.0")
    others = [
        cache_key("b" * 64, "fp16", "9.0", "10.3.0"),
        cache_key("a" * 64, "int8", "9.0", "10.3.0"),
        cache_key("a" * 64, "fp16", "8.6", "10.3.0"),
        cache_key("a" * 64, "fp16", "9.0", "10.4.0"),
    ]
    assert len({base, *others}) == 5


def test_fp16_build_writes_the_engine_and_what_it_fits(model: Path, tmp_path: Path) -> None:
    trt = FakeTensorRT()
    info = build(trt, GPU, model, tmp_path / "eng", "fp16", max_batch=16)  # type: ignore[arg-type]
    assert (tmp_path / "eng" / ENGINE_FILE).read_bytes() == b"PLAN"
    assert read_info(tmp_path / "eng") == info
    assert info.compute_capability == "9.0" and info.tensorrt_version == "10.3.0"
    assert info.model_sha256 == sha256_file(model)
    assert info.cache_key == cache_key(info.model_sha256, "fp16", "9.0", "10.3.0")
    assert ("flag", "FP16") in trt.calls and ("flag", "INT8") not in trt.calls
    assert ("profile", {"input": ([1, 64], [8, 64], [16, 64])}) in trt.calls
    assert trt.calls[-1] == ("build", False)
    # An agent takes it only on the same architecture and TensorRT major.minor.
    assert matches(info, GPU, "10.3.1")
    assert not matches(info, Gpu("NVIDIA A10", "8.6"), "10.3.0")
    assert not matches(info, GPU, "10.4.0")


def test_int8_needs_calibration_rows_and_gets_a_calibrator(model: Path, tmp_path: Path) -> None:
    trt = FakeTensorRT()
    with pytest.raises(InvalidInputError, match="needs calibration rows"):
        build(trt, GPU, model, tmp_path / "e", "int8")  # type: ignore[arg-type]
    rows = {"input": np.zeros((16, 64), np.float32)}
    build(trt, GPU, model, tmp_path / "e", "int8", calibration=rows)  # type: ignore[arg-type]
    assert ("flag", "INT8") in trt.calls and ("calibration_profile",) in trt.calls
    assert trt.calls[-1] == ("build", True)


def test_parser_and_builder_failures_are_clear_and_write_nothing(
    model: Path, tmp_path: Path
) -> None:
    with pytest.raises(EngineBuildError, match="Unsupported operator FooBar"):
        build(FakeTensorRT(parses=False), GPU, model, tmp_path / "a", "fp16")  # type: ignore[arg-type]
    with pytest.raises(EngineBuildError, match="could not build"):
        build(FakeTensorRT(builds=False), GPU, model, tmp_path / "b", "fp16")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not any((tmp_path / "b").iterdir())


def test_probe_names_what_is_missing() -> None:
    def no_trt() -> Any:
        raise ImportError("No module named 'tensorrt'")

    with pytest.raises(EngineSkipped, match="tensorrt is not importable"):
        probe(no_trt)
    with pytest.raises(EngineSkipped, match="no CUDA GPU"):
        probe(lambda: FakeTensorRT(), lambda: None)  # type: ignore[arg-type,return-value]
    trt, gpu = probe(lambda: FakeTensorRT(), lambda: GPU)  # type: ignore[arg-type,return-value]
    assert gpu == GPU and trt.__version__ == "10.3.0"


def test_cli_skips_with_one_line_and_exit_3_here(model: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: the skip path does not apply")
    except ImportError:
        pass
    out = tmp_path / "eng"
    done = fogline("model", "build-engine", "--model", str(model), "--precision", "fp16",
                   "--out", str(out))  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        "skipped: tensorrt is not importable (No module named 'tensorrt'); TensorRT engines "
        "need the tensorrt package with its CUDA libraries and an NVIDIA GPU; no engine built"
    ]
    assert not out.exists()
    bad = fogline("model", "build-engine", "--model", str(model), "--precision", "int8",
                  "--out", str(out))  # fmt: skip
    assert bad.returncode == 1 and "needs calibration rows" in bad.stderr
    info = json.dumps({"model_sha256": "x"})
    (tmp_path / "engine.json").write_text(info)
    with pytest.raises(InvalidInputError):
        read_info(tmp_path)
