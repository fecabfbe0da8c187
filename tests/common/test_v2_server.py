"""The V2 REST layer against a real ONNX Runtime model, served on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from common.errors import ModelNotFoundError
from common.inference import MODEL_VERSION, InferRequest, InferResponse, Tensor
from common.onnx_runtime import OnnxRuntime
from common.runtime import ModelInfo
from common.serving_metrics import parse
from common.v2_server import BINARY_HEADER, V2_STATE, DataPlane, build_v2_app
from tests.model_fixtures import Package, reference_output, toy_input, v2_infer_body

GOOD_BODY = v2_infer_body(2)


@pytest.fixture
def dataplane(runtime: OnnxRuntime) -> DataPlane:
    dp = DataPlane("fogline-test", "0.1.0")
    dp.register(runtime)
    return dp


async def start(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def client(dataplane: DataPlane) -> AsyncIterator[TestClient]:
    c = await start(build_v2_app(dataplane))
    yield c
    await c.close()


class GatedRuntime:
    """A real runtime that holds each infer until the test releases it."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def load(self) -> None:
        await self.inner.load()

    async def infer(self, request: InferRequest) -> InferResponse:
        self.entered.set()
        await self.release.wait()
        return await self.inner.infer(request)

    async def unload(self) -> None:
        await self.inner.unload()


class BrokenRuntime(GatedRuntime):
    async def infer(self, request: InferRequest) -> InferResponse:
        raise RuntimeError("secret internal detail")


async def assert_error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]
    return body


async def assert_good_infer(client: TestClient, model_path: Path) -> None:
    resp = await client.post("/v2/models/toy/infer", json=GOOD_BODY)
    assert resp.status == 200, await resp.text()
    out = (await resp.json())["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, reference_output(model_path, toy_input(2)), atol=1e-6)


# --- health and metadata ----------------------------------------------------------------


async def test_health(client: TestClient) -> None:
    resp = await client.get("/v2/health/live")
    assert resp.status == 200 and await resp.json() == {"live": True}
    resp = await client.get("/v2/health/ready")
    assert resp.status == 200 and await resp.json() == {"ready": True}


async def test_not_ready_without_models() -> None:
    c = await start(build_v2_app(DataPlane("empty", "0")))
    try:
        resp = await c.get("/v2/health/ready")
        assert resp.status == 503 and await resp.json() == {"ready": False}
        assert (await c.get("/v2/health/live")).status == 200
    finally:
        await c.close()


async def test_server_metadata(client: TestClient) -> None:
    resp = await client.get("/v2")
    assert resp.status == 200
    assert await resp.json() == {
        "name": "fogline-test",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


@pytest.mark.parametrize("path", ["/v2/models/toy", "/v2/models/toy/versions/1"])
async def test_model_metadata(client: TestClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    doc = await resp.json()
    assert doc["name"] == "toy" and doc["versions"] == ["1"]
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert doc["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize(
    "path", ["/v2/models/nope", "/v2/models/toy/versions/2", "/v2/models/nope/ready"]
)
async def test_unknown_model_metadata_is_404(client: TestClient, path: str) -> None:
    body = await assert_error(await client.get(path), 404)
    assert "unknown model" in body["error"]


@pytest.mark.parametrize("path", ["/v2/models/toy/ready", "/v2/models/toy/versions/1/ready"])
async def test_model_ready(client: TestClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200 and await resp.json() == {"name": "toy", "ready": True}


async def test_unloaded_model_is_not_ready(client: TestClient, runtime: OnnxRuntime) -> None:
    await runtime.unload()
    resp = await client.get("/v2/models/toy/ready")
    assert resp.status == 503 and await resp.json() == {"name": "toy", "ready": False}
    assert (await client.get("/v2/health/ready")).status == 503
    resp = await client.post("/v2/models/toy/infer", json=GOOD_BODY)
    await assert_error(resp, 503)
    assert resp.headers["Retry-After"] == "1"


# --- infer ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/models/toy/infer", "/v2/models/toy/versions/1/infer"])
async def test_infer_json(client: TestClient, package: Package, path: str) -> None:
    resp = await client.post(path, json={**GOOD_BODY, "id": "req-7"})
    assert resp.status == 200
    doc = await resp.json()
    assert doc["model_name"] == "toy" and doc["model_version"] == "1" and doc["id"] == "req-7"
    assert doc["parameters"][MODEL_VERSION] == "1"
    [out] = doc["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [2, 10]
    want = reference_output(package.model_path, toy_input(2))
    np.testing.assert_allclose(np.reshape(out["data"], (2, 10)), want, atol=1e-6)


def _body(**tensor: Any) -> dict[str, Any]:
    return {"inputs": [{**GOOD_BODY["inputs"][0], **tensor}]}


BAD_REQUESTS = {
    "malformed JSON": b'{"inputs": [',
    "not an object": b"[1, 2]",
    "no inputs": b"{}",
    "wrong datatype": json.dumps(_body(datatype="INT32", data=[1] * 128)).encode(),
    "unknown datatype": json.dumps(_body(datatype="FP8")).encode(),
    "wrong shape": json.dumps(_body(shape=[2, 63], data=[0.0] * 126)).encode(),
    "shape/data mismatch": json.dumps(_body(shape=[3, 64])).encode(),
    "wrong input name": json.dumps(_body(name="x")).encode(),
    "unknown output": json.dumps({**GOOD_BODY, "outputs": [{"name": "logits"}]}).encode(),
    "data not numbers": json.dumps(_body(data=["a"] * 128)).encode(),
    "null data": json.dumps(_body(data=None)).encode(),
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_request_is_400_and_server_keeps_serving(
    client: TestClient, package: Package, body: bytes
) -> None:
    resp = await client.post(
        "/v2/models/toy/infer", data=body, headers={"Content-Type": "application/json"}
    )
    await assert_error(resp, 400)
    await assert_good_infer(client, package.model_path)


@pytest.mark.parametrize("path", ["/v2/models/nope/infer", "/v2/models/toy/versions/9/infer"])
async def test_infer_unknown_model_is_404(client: TestClient, package: Package, path: str) -> None:
    await assert_error(await client.post(path, json=GOOD_BODY), 404)
    await assert_good_infer(client, package.model_path)


async def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    await assert_error(await client.get("/v2/nothing/here"), 404)
    resp = await client.get("/v2/models/toy/infer")
    await assert_error(resp, 405)
    assert "POST" in resp.headers["Allow"]


async def test_unexpected_error_is_generic_500(
    client: TestClient, dataplane: DataPlane, runtime: OnnxRuntime, package: Package
) -> None:
    broken = BrokenRuntime(runtime)
    dataplane.register(broken)
    body = await assert_error(await client.post("/v2/models/toy/infer", json=GOOD_BODY), 500)
    assert "secret" not in body["error"]
    dataplane.register(runtime)
    await assert_good_infer(client, package.model_path)


async def test_body_too_large_is_413() -> None:
    c = await start(build_v2_app(DataPlane("s", "0"), client_max_size=1024))
    try:
        resp = await c.post("/v2/models/toy/infer", json=GOOD_BODY)
        await assert_error(resp, 413)
    finally:
        await c.close()


# --- dataplane registry -----------------------------------------------------------------


async def test_register_replaces_and_unregister_removes(
    client: TestClient, dataplane: DataPlane, runtime: OnnxRuntime, package: Package
) -> None:
    v2 = OnnxRuntime(package.model_path, replace(package.manifest, version="2"))
    await v2.load()
    dataplane.register(v2)
    assert dataplane.get("toy").info.version == "2"
    with pytest.raises(ModelNotFoundError):
        dataplane.get("toy", "1")
    resp = await client.post("/v2/models/toy/versions/2/infer", json=GOOD_BODY)
    assert (await resp.json())["model_version"] == "2"
    assert dataplane.unregister("toy") is v2
    await assert_error(await client.post("/v2/models/toy/infer", json=GOOD_BODY), 404)
    assert dataplane.unregister("toy") is None


# --- auth, load shedding, metrics -------------------------------------------------------


@pytest.fixture
async def auth_client(dataplane: DataPlane) -> AsyncIterator[TestClient]:
    c = await start(build_v2_app(dataplane, auth_tokens={"t0ken", "other"}))
    yield c
    await c.close()


@pytest.mark.parametrize("path", ["/v2", "/v2/models", "/v2/models/toy", "/v2/models/toy/ready"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic t0ken", "Bearer "])
async def test_auth_required(auth_client: TestClient, path: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    resp = await auth_client.get(path, headers=headers)
    await assert_error(resp, 401)
    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_auth_accepts_token_and_spares_health(auth_client: TestClient) -> None:
    assert (await auth_client.get("/v2/health/live")).status == 200
    assert (await auth_client.get("/v2/health/ready")).status == 200
    await assert_error(await auth_client.post("/v2/models/toy/infer", json=GOOD_BODY), 401)
    headers = {"Authorization": "Bearer t0ken"}
    resp = await auth_client.post("/v2/models/toy/infer", json=GOOD_BODY, headers=headers)
    assert resp.status == 200
    assert (await auth_client.get("/v2/models", headers=headers)).status == 200


async def test_load_shedding(runtime: OnnxRuntime) -> None:
    gated = GatedRuntime(runtime)
    dp = DataPlane("s", "0")
    dp.register(gated)
    c = await start(build_v2_app(dp, max_inflight=1))
    try:
        first = asyncio.create_task(c.post("/v2/models/toy/infer", json=GOOD_BODY))
        await asyncio.wait_for(gated.entered.wait(), 5)
        shed = await c.post("/v2/models/toy/infer", json=GOOD_BODY)
        await assert_error(shed, 503)
        assert shed.headers["Retry-After"] == "1"
        gated.release.set()
        assert (await first).status == 200
        assert (await c.post("/v2/models/toy/infer", json=GOOD_BODY)).status == 200
        metrics = await (await c.get("/metrics")).text()
        assert "fogline_v2_shed_total 1" in metrics
    finally:
        await c.close()


async def test_metrics(client: TestClient) -> None:
    await client.post("/v2/models/toy/infer", json=GOOD_BODY)
    await client.post("/v2/models/toy/infer", json=GOOD_BODY)
    await client.post("/v2/models/toy/infer", data=b"{")
    await client.post("/v2/models/ghost/infer", json=GOOD_BODY)
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    m = parse(await resp.text())
    toy = {"model": "toy", "version": "1"}
    assert m["nv_inference_request_success_total"] == [(toy, 2.0)]
    assert sorted(m["nv_inference_request_failure_total"], key=str) == sorted(
        [({"model": "_unknown", "version": "", "reason": "404"}, 1.0),
         ({**toy, "reason": "400"}, 1.0)], key=str
    )  # fmt: skip
    assert (toy, 3.0) in m["fogline_inference_request_seconds_count"]
    assert m["fogline_model_loaded"] == [(toy, 1.0)]
    assert m["fogline_v2_inflight"] == [({}, 0.0)]
    assert client.server.app[V2_STATE].gate.inflight == 0


# --- standard clients -------------------------------------------------------------------


async def test_kserve_client_json(client: TestClient, package: Package) -> None:
    """What kserve's InferenceRESTClient (v2) sends: id, empty parameters, nested data."""
    x = toy_input(1)
    body = {
        "id": "5c3d4e00-kserve",
        "parameters": {},
        "inputs": [
            {
                "name": "input",
                "shape": [1, 64],
                "datatype": "FP32",
                "parameters": {},
                "data": x.tolist(),
            }
        ],
    }
    resp = await client.post("/v2/models/toy/infer", json=body)
    doc = await resp.json()
    assert resp.status == 200 and doc["id"] == "5c3d4e00-kserve"
    got = np.reshape(doc["outputs"][0]["data"], doc["outputs"][0]["shape"])
    np.testing.assert_allclose(got, reference_output(package.model_path, x), atol=1e-6)


async def test_tritonclient_json(client: TestClient, package: Package) -> None:
    """tritonclient.http with InferInput(binary_data=False) and a JSON output."""
    x = toy_input(3)
    raw = (
        '{"inputs":[{"name":"input","shape":[3,64],"datatype":"FP32","data":'
        + json.dumps(x.ravel().tolist()).replace(" ", "")
        + '}],"outputs":[{"name":"probabilities","parameters":{"binary_data":false}}]}'
    )
    resp = await client.post("/v2/models/toy/infer", data=raw.encode())
    assert resp.status == 200 and BINARY_HEADER not in resp.headers
    out = (await resp.json())["outputs"][0]
    assert out["shape"] == [3, 10]
    np.testing.assert_allclose(
        np.reshape(out["data"], (3, 10)), reference_output(package.model_path, x), atol=1e-6
    )


async def test_tritonclient_binary(client: TestClient, package: Package) -> None:
    """tritonclient.http defaults: binary input tensor, binary_data_output, no outputs named."""
    x = toy_input(2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    resp = await client.post(
        "/v2/models/toy/infer",
        data=header + x.astype("<f4").tobytes(),
        headers={BINARY_HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    n = int(resp.headers[BINARY_HEADER])
    doc = json.loads(raw[:n])
    [out] = doc["outputs"]
    assert out["shape"] == [2, 10] and "data" not in out
    assert out["parameters"]["binary_data_size"] == len(raw) - n == 2 * 10 * 4
    got = np.frombuffer(raw[n:], "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, reference_output(package.model_path, x), atol=1e-6)


@pytest.mark.parametrize(
    ("size", "extra"), [(100, b""), (256, b""), (256 * 2 + 3, b"xyz"), (-1, b"")]
)
async def test_bad_binary_is_400(
    client: TestClient, package: Package, size: int, extra: bytes
) -> None:
    x = toy_input(2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ],
        }
    ).encode()
    resp = await client.post(
        "/v2/models/toy/infer",
        data=header + x.tobytes()[: max(size, 0)] + extra,
        headers={BINARY_HEADER: str(len(header))},
    )
    await assert_error(resp, 400)
    await assert_good_infer(client, package.model_path)


async def test_bad_binary_header_is_400(client: TestClient) -> None:
    for value in ["abc", "99999"]:
        resp = await client.post("/v2/models/toy/infer", data=b"{}", headers={BINARY_HEADER: value})
        await assert_error(resp, 400)


async def test_mixed_binary_and_json_outputs(runtime: OnnxRuntime) -> None:
    """Binary outputs are chosen per output; the rest stay JSON, in order."""
    from common.v2_binary import BinaryOutputs, encode_infer_response

    a = Tensor("a", np.arange(6, dtype=np.int64).reshape(2, 3))
    b = Tensor("b", np.array([True, False]))
    c = Tensor("c", np.ones((1,), np.float16))
    resp = InferResponse("m", [a, b, c], version="3")
    body, n = encode_infer_response(resp, BinaryOutputs(True, {"b": False}))
    assert n is not None
    doc = json.loads(body[:n])
    assert [o["name"] for o in doc["outputs"]] == ["a", "b", "c"]
    assert doc["outputs"][1]["data"] == [True, False]
    sizes = [o["parameters"]["binary_data_size"] for o in (doc["outputs"][0], doc["outputs"][2])]
    assert sizes == [48, 2]
    assert np.array_equal(np.frombuffer(body[n : n + 48], "<i8").reshape(2, 3), a.data)
    assert np.frombuffer(body[n + 48 :], "<f2")[0] == 1.0
