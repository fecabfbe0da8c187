"""Hardware reports and package choice: the door, the decision, the agent's check (tables)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import InvalidInputError, TargetMismatchError
from common.hardware import (
    ONNX_PACKAGE,
    TENSORRT,
    Hardware,
    check_package_fits,
    choose_package,
    engine_package_id,
    parse_hardware,
    parse_runtimes,
)
from common.manifest import Target
from tests.model_fixtures import make_package

ORIN = {
    "arch": "aarch64",
    "accelerator": "cuda",
    "gpu": "Orin (nvgpu)",
    "compute_capability": "8.7",
    "tensorrt_version": "10.3.0",
}
ENGINES = {("8.7", "10.3"): "trt-cc8.7-10.3", ("8.9", "10.3"): "trt-cc8.9-10.3"}


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({}, Hardware()),
        (None, Hardware()),
        ({"arch": "x86_64", "system": "Linux"}, Hardware("x86_64", "Linux")),
        ({"arch": "AMD64"}, Hardware("x86_64")),
        ({"arch": "arm64"}, Hardware("aarch64")),
        (ORIN, Hardware("aarch64", None, "cuda", "Orin (nvgpu)", "8.7", "10.3.0")),
    ],
)
def test_good_reports_parse(report, expected) -> None:
    assert parse_hardware(report) == expected


@pytest.mark.parametrize(
    ("report", "error"),
    [
        ({"arch": "x" * 100_000}, "arch"),
        ({"arch": "../x"}, "arch"),
        ({"arch": "x86_64", "system": "Linux\n"}, "system"),
        ({**ORIN, "compute_capability": "../x"}, "compute capability"),
        ({**ORIN, "compute_capability": math.nan}, "compute capability"),
        ({**ORIN, "compute_capability": 8.7}, "compute capability"),
        ({**ORIN, "tensorrt_version": "10.3.0\n"}, "TensorRT version"),
        ({**ORIN, "tensorrt_version": "1" * 10_000}, "TensorRT version"),
        ({**ORIN, "gpu": "A" * 10_000}, "GPU name"),
        ({**ORIN, "gpu": "<script>"}, "GPU name"),
        ({**ORIN, "accelerator": "quantum"}, "accelerator"),
        ({"arch": "x86_64", "junk": "x"}, "unknown keys"),
        ({f"k{i}": "x" for i in range(100)}, "at most"),
        (["x86_64"], "object"),
        ("x86_64", "object"),
    ],
)
def test_malformed_reports_are_refused_whole(report, error) -> None:
    with pytest.raises(InvalidInputError, match=error):
        parse_hardware(report)


@given(
    st.sampled_from(["x86_64", "aarch64", "armv7l"]),
    st.sampled_from([None, ("8.7", "10.3.0"), ("12.0", "10.13.2.6"), ("7.2", "8.5")]),
)
def test_a_report_round_trips(arch: str, gpu: tuple[str, str] | None) -> None:
    hw = Hardware(arch, "Linux")
    if gpu is not None:
        hw = replace(hw, accelerator="cuda", compute_capability=gpu[0], tensorrt_version=gpu[1])
    assert parse_hardware(json.loads(json.dumps(hw.to_dict()))) == hw


@pytest.mark.parametrize(
    ("hardware", "runtimes", "package"),
    [
        (parse_hardware(ORIN), [TENSORRT], "trt-cc8.7-10.3"),
        (parse_hardware({**ORIN, "tensorrt_version": "10.3.1"}), [TENSORRT], "trt-cc8.7-10.3"),
        (parse_hardware({**ORIN, "tensorrt_version": "10.4.0"}), [TENSORRT], ONNX_PACKAGE),
        (parse_hardware({**ORIN, "compute_capability": "8.6"}), [TENSORRT], ONNX_PACKAGE),
        (parse_hardware(ORIN), ["onnxruntime"], ONNX_PACKAGE),  # cannot serve engines
        (parse_hardware({**ORIN, "accelerator": "cpu"}), [TENSORRT], ONNX_PACKAGE),
        (Hardware("x86_64"), [TENSORRT], ONNX_PACKAGE),
        (Hardware("aarch64"), [], ONNX_PACKAGE),
        (None, [TENSORRT], ONNX_PACKAGE),  # a report that was refused
    ],
)
def test_package_choice(hardware, runtimes, package) -> None:
    assert choose_package(hardware, runtimes, ENGINES) == package
    assert choose_package(hardware, runtimes, {}) == ONNX_PACKAGE


def test_runtimes_and_package_ids() -> None:
    assert parse_runtimes(["onnxruntime", "tensorrt", "../x", 3]) == ["onnxruntime", "tensorrt"]
    assert parse_runtimes("tensorrt") == [] and parse_runtimes(["x"] * 100) == []
    assert engine_package_id("8.7", "10.3.0") == "trt-cc8.7-10.3"
    with pytest.raises(InvalidInputError):
        engine_package_id("../8.7", "10.3.0")


def test_an_agent_runs_onnx_anywhere_and_an_engine_only_where_it_fits(tmp_path) -> None:
    onnx = make_package(tmp_path / "p").manifest
    engine = replace(onnx, format="tensorrt", target=Target("any", "cuda", "10.3.0", "8.7"))
    check_package_fits(onnx, Hardware("x86_64"), ("onnxruntime",))
    check_package_fits(engine, parse_hardware(ORIN), ("onnxruntime", TENSORRT))
    cases = [
        (Hardware("x86_64"), (TENSORRT,), "no CUDA GPU with TensorRT"),
        (parse_hardware({**ORIN, "compute_capability": "7.2"}), (TENSORRT,), "7.2"),
        (parse_hardware(ORIN), ("onnxruntime",), "no TensorRT runtime"),
        (parse_hardware({**ORIN, "arch": "x86_64"}), (TENSORRT,), None),  # target arch any
    ]
    for hardware, runtimes, why in cases:
        if why is None:
            check_package_fits(engine, hardware, runtimes)
            continue
        with pytest.raises(TargetMismatchError, match=why) as caught:
            check_package_fits(engine, hardware, runtimes)
        assert "still serving with ONNX Runtime" in str(caught.value)
    pinned = replace(engine, target=replace(engine.target, arch="x86_64"))
    with pytest.raises(TargetMismatchError, match="for x86_64, this device is aarch64"):
        check_package_fits(pinned, parse_hardware(ORIN), (TENSORRT,))
