"""Requests under limits: slow bodies, sizes per route, depth, NaN, element caps, byte budget.

A real V2 server (real ONNX Runtime model) on loopback; slow clients are raw
sockets, since no HTTP client library holds a body open on purpose.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from common.onnx_runtime import OnnxRuntime
from common.request_body import RequestLimits
from common.tensor_json import JsonLimits
from common.v2_server import BINARY_HEADER, V2_STATE, DataPlane, build_v2_app
from tests.common.test_v2_server import GatedRuntime, assert_error
from tests.model_fixtures import toy_input, v2_infer_body

GOOD = v2_infer_body(2)
INFER = "/v2/models/toy/infer"


async def serve(runtime: Any, **kw: Any) -> TestClient:
    dp = DataPlane("s", "0")
    dp.register(runtime)
    client = TestClient(TestServer(build_v2_app(dp, **kw), host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def client(runtime: OnnxRuntime) -> AsyncIterator[TestClient]:
    c = await serve(runtime)
    yield c
    await c.close()


async def post_raw(client: TestClient, body: bytes, **headers: str) -> Any:
    return await client.post(
        INFER, data=body, headers={"Content-Type": "application/json", **headers}
    )


# --- a body held open never holds an inference slot ------------------------------------


async def hold_body_open(port: int, declared: int) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + b'{"inputs": [')  # and then nothing more
    await writer.drain()
    return reader, writer


async def test_slow_bodies_get_408_and_never_hold_a_slot(runtime: OnnxRuntime) -> None:
    """Issue 5: 64 bodies held open took every slot; 79 of 79 valid requests got 503."""
    limits = RequestLimits(body_timeout_s=1.5)
    c = await serve(runtime, max_inflight=4, limits=limits)
    try:
        assert c.port is not None
        held = [await hold_body_open(c.port, 100_000) for _ in range(16)]
        await asyncio.sleep(0.2)  # every slow request is in its handler now
        for _ in range(10):
            resp = await c.post(INFER, json=GOOD)
            assert resp.status == 200, await resp.text()
        assert c.server.app[V2_STATE].gate.shed == 0
        for reader, writer in held:
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert b" 408 " in status_line, status_line
            writer.close()
        assert (await c.post(INFER, json=GOOD)).status == 200
    finally:
        await c.close()


# --- sizes per route --------------------------------------------------------------------


async def test_body_limits_per_route(runtime: OnnxRuntime) -> None:
    limits = RequestLimits(max_body=200_000, max_small_body=1024, decode_budget=400_000)
    c = await serve(runtime, limits=limits)
    try:
        big = json.dumps(v2_infer_body(300)).encode()  # about 250 kB
        assert len(big) > limits.max_body
        body = await assert_error(await post_raw(c, big), 413)
        assert "limit" in body["error"]
        assert (await c.post(INFER, json=v2_infer_body(100))).status == 200  # ~80 kB: fine
        await assert_error(await c.get("/v2/models/toy", data=b"x" * 2048), 413)
        assert (await c.get("/v2/models/toy", data=b"x" * 100)).status == 200
    finally:
        await c.close()


# --- JSON: depth, NaN, numbers ----------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
async def test_deep_json_is_400_not_500(client: TestClient, depth: int) -> None:
    """Issue 5: 1,000 levels gave a 500 (uncaught RecursionError)."""
    for body in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        resp = await post_raw(client, body.encode())
        assert "nested deeper" in (await assert_error(resp, 400))["error"]
    nested = {"inputs": [{**GOOD["inputs"][0], "parameters": {"p": [[[[[[[[1]]]]]]]]}}]}
    assert (await client.post(INFER, json=nested)).status == 200  # depth 11 is fine


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]


@pytest.mark.parametrize("token", NON_FINITE)
@pytest.mark.parametrize("rows", [1, 40])  # short data (Python path) and long (numpy path)
async def test_non_finite_numbers_in_requests_are_400(
    client: TestClient, token: str, rows: int
) -> None:
    """Issue 5: bare NaN was answered 200, with NaN in the JSON reply."""
    data = ", ".join(["0.5"] * (rows * 64 - 1) + [token])
    body = f'{{"inputs": [{{"name": "input", "datatype": "FP32", "shape": [{rows}, 64], '
    body += f'"data": [{data}]}}]}}'
    resp = await post_raw(client, body.encode())
    await assert_error(resp, 400)
    resp = await post_raw(client, json.dumps({**GOOD, "parameters": {"x": 1}}).encode())
    assert resp.status == 200
    params = f'{{"x": {token}}}'.encode()
    resp = await post_raw(
        client, json.dumps(GOOD).encode()[:-1] + b', "parameters": ' + params + b"}"
    )
    await assert_error(resp, 400)


async def test_non_finite_outputs_are_never_bare_nan(client: TestClient) -> None:
    """NaN in (binary) gives NaN out: JSON answers refuse clearly, binary answers carry it."""
    x = toy_input(1)
    x[0, 0] = np.nan
    head = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}]}  # fmt: skip
    header = json.dumps(head).encode()
    hdrs = {BINARY_HEADER: str(len(header))}
    resp = await client.post(INFER, data=header + x.tobytes(), headers=hdrs)
    error = (await assert_error(resp, 422))["error"]
    assert "NaN" in error and "binary" in error
    head["parameters"] = {"binary_data_output": True}
    header = json.dumps(head).encode()
    hdrs = {BINARY_HEADER: str(len(header))}
    resp = await client.post(INFER, data=header + x.tobytes(), headers=hdrs)
    assert resp.status == 200
    raw = await resp.read()
    n = int(resp.headers[BINARY_HEADER])
    assert b"NaN" not in raw[:n]
    assert np.isnan(np.frombuffer(raw[n:], "<f4")).all()


# --- element caps, before any array exists ---------------------------------------------


async def test_huge_declared_shape_is_413_before_conversion(runtime: OnnxRuntime) -> None:
    limits = RequestLimits(json=JsonLimits(max_elements=10_000, max_values=5_000))
    c = await serve(runtime, limits=limits)
    try:
        for shape in ([2**31, 64], [2**62, 2**62], [200, 64]):
            body = {"inputs": [{**GOOD["inputs"][0], "shape": shape}]}
            resp = await c.post(INFER, json=body)
            assert "tensor elements" in (await assert_error(resp, 413))["error"]
        many = {**GOOD, "parameters": {"p": [True] * 6000}}  # Python objects: bounded too
        await assert_error(await c.post(INFER, json=many), 413)
        assert (await c.post(INFER, json=v2_infer_body(100))).status == 200
    finally:
        await c.close()


# --- the byte budget --------------------------------------------------------------------


async def test_byte_budget_sheds_large_requests_with_503(runtime: OnnxRuntime) -> None:
    gated = GatedRuntime(runtime)
    limits = RequestLimits(max_body=1 << 20, decode_budget=1 << 20)
    c = await serve(gated, limits=limits)
    try:
        big = json.dumps(v2_infer_body(700)).encode()  # ~600 kB: two do not fit at once
        first = asyncio.create_task(post_raw(c, big))
        await asyncio.wait_for(gated.entered.wait(), 10)
        shed = await post_raw(c, big)
        await assert_error(shed, 503)
        assert shed.headers["Retry-After"] == "1"
        small = asyncio.create_task(c.post(INFER, json=GOOD))  # fits beside the first
        gated.release.set()
        assert (await first).status == 200 and (await small).status == 200
        assert (await post_raw(c, big)).status == 200
        state = c.server.app[V2_STATE]
        assert state.budget.used == 0 and state.budget.shed == 1
        assert "fogline_v2_bytes_shed_total 1" in await (await c.get("/metrics")).text()
    finally:
        await c.close()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        RequestLimits(max_body=100, decode_budget=50)
    with pytest.raises(ValueError):
        RequestLimits(body_timeout_s=0)


async def test_bad_binary_header_values_are_400(client: TestClient) -> None:
    for value in ["²", "١٢", "9" * 5000, "-1", " 12", "0x10"]:
        resp = await client.post(INFER, data=b"{}", headers={BINARY_HEADER: value})
        await assert_error(resp, 400)
