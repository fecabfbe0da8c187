"""Commands the agent refuses: what its ``rejected`` events may say, over a real broker.

Anyone can publish on a device's commands topic; the event the agent sends back
is attributed to that device, so nothing from an unverified payload may go into
it -- above all not a command id, which the control plane matches to rollouts.
"""

from __future__ import annotations

import asyncio
import json
import time

from common import topics
from common.messages import Command, sign_command
from common.mqtt import MqttLink
from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane, agent_config

ATTACKER_ID = "attacker-chosen-id-4242"
ATTACKER_KEY = "attacker-key-id-77"


async def _rejections(cp: ControlPlane, device_id: str, n: int) -> list[dict]:
    await cp.wait_event(device_id, "rejected")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in cp.registry.events(device_id) if e["stage"] == "rejected"]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} rejected events")


async def test_rejected_unverified_commands_carry_no_attacker_id(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-cmd", mosquitto, cp.signer.public_key_hex)
        topic = topics.device_topic(cfg.device_id, "commands")
        fake = Command("deploy", cfg.device_id, 99, time.time() + 60, {}, id=ATTACKER_ID)
        unsigned = {"command": fake.to_dict(), "signature": "00" * 64, "key_id": ATTACKER_KEY}
        trusted_key_bad_sig = {**unsigned, "key_id": cp.signer.key_id}
        no_signature = {"command": fake.to_dict()}
        async with (
            EdgeAgent(cfg),
            MqttLink(client_id="cmd-attacker", host=mosquitto.host, port=mosquitto.port) as evil,
        ):
            await cp.wait_online([cfg.device_id])
            await evil.wait_connected(5)
            for doc in (unsigned, trusted_key_bad_sig, no_signature):
                await evil.publish(topic, json.dumps(doc).encode())
            events = await _rejections(cp, cfg.device_id, 3)
            for ev in events:
                assert ev["command_id"] is None, ev
                assert ATTACKER_ID not in json.dumps(ev) and ATTACKER_KEY not in json.dumps(ev)

            # A verified command refused for its sequence number is named: its id is ours.
            body = {"package": v1.signed.to_dict(), "artifact": {"digest": v1.artifact_digest}}
            stale = Command("rollback", cfg.device_id, 0, time.time() + 60, body)
            await cp.rollouts.link.publish(topic, sign_command(stale, cp.signer))
            ev = await cp.wait_event(cfg.device_id, "rejected", command_id=stale.id)
            assert "seq" in ev["error"]


async def test_replay_of_an_accepted_command_does_not_reject_it(mosquitto, tmp_path) -> None:
    """The replayed bytes are refused, but the event names no command: the original (which
    may still be running) must not be reported as rejected."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-rep", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg):
            await cp.wait_online([cfg.device_id])
            state = await cp.roll_out("toy", "1", [cfg.device_id])
            assert state["state"] == "succeeded", state
            cmd = Command(
                "rollback", cfg.device_id, cp.registry.next_seq(cfg.device_id), time.time() + 60, {}
            )
            payload = sign_command(cmd, cp.signer)
            topic = topics.device_topic(cfg.device_id, "commands")
            await cp.rollouts.link.publish(topic, payload)
            await cp.final_event(cfg.device_id, cmd.id)  # ran (and failed: no previous slot)
            await cp.rollouts.link.publish(topic, payload)  # the same bytes again
            (ev,) = await _rejections(cp, cfg.device_id, 1)
            assert "seq" in ev["error"] and ev["command_id"] is None
            outcome = [e for e in cp.registry.events(cfg.device_id) if e["command_id"] == cmd.id]
            assert "rejected" not in {e["stage"] for e in outcome}
