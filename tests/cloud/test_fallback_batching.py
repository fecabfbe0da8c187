"""The fallback batches and reports it: a real server on loopback, scraped like Prometheus."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.fallback import FallbackSettings, build_fallback_app, register_cli, settings_from_args
from cloud.fallback.server import FALLBACK_REPOSITORY
from common.batch_settings import BatchSettings
from common.batcher import BatchingRuntime
from common.errors import InvalidInputError
from common.inference import SERVED_BY
from common.serving_metrics import parse
from tests.model_fixtures import Package, make_package, reference_output, toy_input


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_package(tmp_path_factory.mktemp("batchpkg"), version="c1", variant="cloud")


SPIN_KEY = "session.intra_op.allow_spinning"


def body(x: np.ndarray) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }


async def test_fallback_batches_concurrent_requests_and_exposes_metrics(package: Package) -> None:
    settings = FallbackSettings(packages=[package.directory])
    assert settings.batching == BatchSettings(max_batch=0)  # on by default, max from hints
    app = await build_fallback_app(settings)
    c = TestClient(TestServer(app, host="127.0.0.1"))
    await c.start_server()
    try:
        meta = await (await c.get("/v2/models/toy")).json()
        params = meta["parameters"]
        assert params["fogline.batching.max_batch"] == 64  # the hint (64), at most 64
        assert 1 <= params["fogline.batching.preferred_batch"] <= 64
        assert "rows_per_s" in params["fogline.batching.calibration"]
        xs = [toy_input(1, seed=i) for i in range(48)]
        answers = await asyncio.gather(*(c.post("/v2/models/toy/infer", json=body(x)) for x in xs))
        for x, resp in zip(xs, answers, strict=True):
            doc = await resp.json()
            assert resp.status == 200 and doc["parameters"][SERVED_BY] == "cloud"
            got = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(1, -1)
            np.testing.assert_allclose(got, reference_output(package.model_path, x), rtol=1e-5)
        resp = await c.get("/metrics")
        assert resp.status == 200
        m = parse(await resp.text())
        toy = {"model": "toy", "version": "c1"}
        assert m["nv_inference_request_success_total"] == [(toy, 48.0)]
        assert m["nv_inference_count_total"] == [(toy, 48.0)]
        executions = m["nv_inference_exec_count_total"][0][1]
        assert 1 <= executions < 48  # batching is visible: fewer runs than inferences
        served = {"model": "toy", "served_by": "cloud", "reason": ""}
        assert m["fogline_requests_served_total"] == [(served, 48.0)]
        assert m["fogline_model_loaded"] == [(toy, 1.0)]
        assert (toy, 48.0) in m["fogline_inference_queue_seconds_count"]
        assert (toy, 48.0) in m["fogline_inference_compute_seconds_count"]
        assert (toy, executions) in m["fogline_batch_size_count"]
    finally:
        await c.close()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["serve", "--package", "p", *argv])


def test_batching_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args(_args("--max-batch", "1")).batching is None  # 1: off
    on = settings_from_args(_args("--max-batch", "16", "--batch-delay-us", "250"))
    assert on.batching == BatchSettings(max_batch=16, max_delay_us=250.0)
    monkeypatch.setenv("FOGLINE_FALLBACK_MAX_BATCH", "8")
    assert settings_from_args(_args()).batching == BatchSettings(max_batch=8)
    for bad in (["--max-batch", "-1"], ["--max-batch", "5000"], ["--batch-delay-us", "nan"]):
        with pytest.raises(InvalidInputError):
            settings_from_args(_args(*bad))


async def test_onnx_runtime_threads_sleep_when_idle_unless_asked_to_spin(
    package: Package, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_from_args(_args()).ort_spinning is False
    assert settings_from_args(_args("--ort-spinning")).ort_spinning is True
    monkeypatch.setenv("FOGLINE_FALLBACK_ORT_SPINNING", "true")
    assert settings_from_args(_args()).ort_spinning is True
    for spinning in (False, True):
        settings = FallbackSettings(packages=[package.directory], ort_spinning=spinning)
        app = await build_fallback_app(settings)
        try:
            (served,) = list(app[FALLBACK_REPOSITORY])
            batcher = served.inner
            assert isinstance(batcher, BatchingRuntime)
            options = batcher.inner._session.get_session_options()
            if spinning:  # ONNX Runtime's default: no entry at all
                with pytest.raises(Exception, match="allow_spinning"):
                    options.get_session_config_entry(SPIN_KEY)
            else:
                assert options.get_session_config_entry(SPIN_KEY) == "0"
        finally:
            await app[FALLBACK_REPOSITORY].close()
