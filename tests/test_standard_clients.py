"""Standard V2 clients, unchanged: NVIDIA's tritonclient against the agent and the fallback.

tritonclient.http is synchronous (gevent), so it runs in a worker thread while the
servers run on this test's event loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cloud.fallback import FallbackSettings, build_fallback_app
from edge.agent import EdgeAgent
from tests.conftest import free_port
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.model_fixtures import make_package, reference_output, toy_input

httpclient = pytest.importorskip("tritonclient.http")


def triton_infer(url: str, rows: np.ndarray, *, binary: bool, headers=None) -> dict:
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        meta = client.get_model_metadata("toy", headers=headers)
        inp = httpclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("toy", [inp], outputs=[out], headers=headers)
        return {
            "meta": meta,
            "probs": result.as_numpy("probabilities"),
            "response": result.get_response(),
        }
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False])
async def test_tritonclient_against_the_agent_and_the_fallback(mosquitto, tmp_path, binary):
    rows = toy_input(3)
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        edge_model = cp.publish_toy(tmp_path, "1").package_dir / "model.onnx"
        cloud_pkg = make_package(tmp_path / "cloud", variant="cloud", seed=3)
        cp.registry.publish(cloud_pkg.directory, cloud_pkg.manifest, cp.signer)

        from aiohttp import web

        fallback_port = free_port()
        app = await build_fallback_app(
            FallbackSettings(
                control_url=cp.url,
                control_token=cp.tokens["viewer"],
                models=["toy:1"],
                cache_dir=tmp_path / "cache",
                trusted_keys=[cp.signer.public_key_hex],
                tokens={"t0ken"},
            )
        )
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", fallback_port).start()
        try:
            cfg = agent_config(tmp_path, "dev-triton", mosquitto, cp.signer.public_key_hex)
            async with EdgeAgent(cfg) as agent:
                await cp.wait_online([cfg.device_id])
                assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
                edge = await asyncio.to_thread(
                    triton_infer, agent.config.api_url, rows, binary=binary
                )
            cloud = await asyncio.to_thread(
                triton_infer,
                f"http://127.0.0.1:{fallback_port}",
                rows,
                binary=binary,
                headers={"Authorization": "Bearer t0ken"},
            )
        finally:
            await runner.cleanup()

    np.testing.assert_allclose(
        edge["probs"],
        reference_output(edge_model, rows),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        cloud["probs"], reference_output(cloud_pkg.model_path, rows), rtol=1e-5
    )
    assert edge["meta"]["inputs"][0]["name"] == "input"
    # Fogline's own fields ride along in the standard response's parameters.
    params = edge["response"].get("parameters", {})
    assert params["fogline.model_version"] == "1"
    assert cloud["response"]["parameters"]["fogline.served_by"] == "cloud"
