"""OnnxRuntime: answers match the raw session; tiny models run inline, others off-loop."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InvalidInputError
from common.inference import InferRequest, Tensor
from common.onnx_runtime import OnnxRuntime
from tests.model_fixtures import make_package, reference_output, toy_input


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("ort"))


def request(rows: int) -> InferRequest:
    return InferRequest(model="toy", inputs=[Tensor("input", toy_input(rows))])


async def test_answers_match_the_raw_session_and_placement_follows_run_time(package) -> None:
    # NOTE: thresholds at the extremes, so placement is decided by the measurement
    # logic alone, not by how busy the machine is.
    fast = OnnxRuntime(package.model_path, package.manifest, inline_below_us=1e9)
    never = OnnxRuntime(package.model_path, package.manifest, inline_below_us=0.0)
    for runtime in (fast, never):
        await runtime.load()
        assert not runtime.runs_inline  # unmeasured: off the loop
        for _ in range(3):
            out = (await runtime.infer(request(5))).output("probabilities").data
            np.testing.assert_allclose(
                out, reference_output(package.model_path, toy_input(5)), rtol=1e-6
            )
    assert fast.runs_inline  # measured, and under its threshold: inline
    assert not never.runs_inline


async def test_wrong_shape_or_datatype_is_invalid_input(package) -> None:
    runtime = OnnxRuntime(package.model_path, package.manifest)
    await runtime.load()
    bad_shape = InferRequest(model="toy", inputs=[Tensor("input", np.zeros((1, 63), np.float32))])
    bad_type = InferRequest(model="toy", inputs=[Tensor("input", np.zeros((1, 64), np.int32))])
    for bad in (bad_shape, bad_type):
        with pytest.raises(InvalidInputError):
            await runtime.infer(bad)
