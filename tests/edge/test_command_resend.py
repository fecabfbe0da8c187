"""A deploy command lost at the broker is resent until the device answers."""

from __future__ import annotations

import asyncio

from edge.agent import EdgeAgent
from tests.conftest import Mosquitto
from tests.edge.agent_harness import ControlPlane, agent_config


async def test_a_command_lost_in_a_broker_restart_is_resent(tmp_path) -> None:
    broker = Mosquitto(tmp_path)  # our own: this test restarts it
    broker.start()
    try:
        async with ControlPlane(tmp_path / "control", broker, resend_after_s=0.5) as cp:
            cp.publish_toy(tmp_path, "1")
            cfg = agent_config(tmp_path, "dev-r", broker, cp.signer.public_key_hex)
            async with EdgeAgent(cfg):
                await cp.wait_online([cfg.device_id])
            # The device is away; its command waits at the broker, which then restarts
            # without persistence: the command is gone.
            rollout_id = await cp.rollouts.start("toy", "1", [cfg.device_id])
            broker.stop()
            broker.start()
            await cp.rollouts.link.wait_connected(30)
            async with EdgeAgent(cfg):
                async with asyncio.timeout(60):
                    while cp.registry.rollout(rollout_id)["state"] == "running":
                        await asyncio.sleep(0.1)
                state = cp.registry.rollout(rollout_id)
                assert state["state"] == "succeeded", state
            assert cp.rollouts.stats["commands_resent"] >= 1
    finally:
        broker.stop()
