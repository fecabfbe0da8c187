"""The hard-example loop, device to control plane, with real parts: an agent that is
unsure escalates to a real fallback, keeps what the cloud answered, and uploads it."""

from __future__ import annotations

import asyncio

import aiohttp

from cloud.hard_examples import HARD_EXAMPLES
from common.device_token import issue_token
from common.manifest import RoutingHints
from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.model_fixtures import make_package, v2_infer_body
from tests.server_processes import start_fallback

ESCALATE_ALL = RoutingHints(uncertainty_threshold=0.0)  # every answer is "uncertain"


async def test_uncertain_escalations_reach_the_control_plane_as_hard_examples(
    mosquitto, tmp_path
) -> None:
    fallback = start_fallback(make_package(tmp_path / "cloud", variant="cloud", seed=3), tmp_path)
    try:
        async with ControlPlane(tmp_path / "control", mosquitto) as cp:
            cp.publish_toy(tmp_path, "1", routing=ESCALATE_ALL)
            cfg = agent_config(
                tmp_path,
                "dev-h",
                mosquitto,
                cp.signer.public_key_hex,
                cloud_url=fallback.url,
                cloud_token=issue_token(cp.signer, "dev-h"),
                control_url=cp.url,
                hard_examples={"upload_interval_s": 0.2},
            )
            async with EdgeAgent(cfg) as agent:
                await cp.wait_online([cfg.device_id])
                assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
                url = f"{cfg.api_url}/v2/models/toy/infer"
                async with aiohttp.ClientSession() as s:
                    for rows in (1, 2, 1):
                        async with s.post(url, json=v2_infer_body(rows)) as resp:
                            doc = await resp.json()
                            assert doc["parameters"]["fogline.served_by"] == "cloud"
                    # Forced to the cloud by the caller: nothing the local model got wrong.
                    body = v2_infer_body(1, **{"fogline.route": "cloud"})
                    async with s.post(url, json=body) as resp:
                        assert resp.status == 200
                store = cp.app[HARD_EXAMPLES]
                async with asyncio.timeout(20):
                    while not store.summary() or store.summary()[0]["rows"] < 4:
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # nothing more comes
                assert store.summary() == [
                    {
                        "model": "toy",
                        "rows": 4,
                        "uploads": store.summary()[0]["uploads"],
                        "devices": 1,
                    }
                ]
                assert agent.hard_examples is not None and agent.hard_examples.pending() == 0
    finally:
        fallback.stop()


def test_without_a_control_url_no_examples_are_kept(tmp_path, mosquitto) -> None:
    cfg = agent_config(tmp_path, "dev-n", mosquitto, "00" * 32, cloud_token="t")
    assert EdgeAgent(cfg).hard_examples is None
