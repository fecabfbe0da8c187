"""Attacks on the artifact topics, over a real broker with a real control plane and agents.

Anyone who can publish on ``artifacts/{a}/chunks`` can make a self-consistent
chunk, and any device can ask for resends on its own ``artifacts/{a}/requests/{d}``
(the test broker has no ACL, so here anyone can, for any id).
These tests play that attacker (a plain MQTT client) and check that rollouts
still deliver the signed model and that the control plane stays responsive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from contextlib import asynccontextmanager, suppress

import aiohttp

from cloud.repair import RepairPolicy
from common import chunking, topics
from common.device_token import issue_token
from common.manifest import SignedManifest
from common.mqtt import MqttLink
from edge.agent import EdgeAgent
from edge.chunk_download import MAX_REJECTION_EVENTS
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.model_fixtures import v2_infer_body


@asynccontextmanager
async def attacker_link(broker, name: str = "attacker"):
    async with MqttLink(client_id=name, host=broker.host, port=broker.port) as link:
        await link.wait_connected(5)
        yield link


def forged_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    """A self-consistent forgery of every chunk: same index, size and offsets, other bytes,
    a header SHA-256 that matches them."""
    out = []
    for c in chunking.split(data, chunk_size):
        other = bytes([c.data[0] ^ 0xFF]) + c.data[1:]
        out.append(dataclasses.replace(c, data=other).encode())
    return out


async def local_version(agent: EdgeAgent) -> str:
    body = v2_infer_body(1, **{"fogline.route": "local"})
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{agent.config.api_url}/v2/models/toy/infer", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return (await resp.json())["parameters"]["fogline.model_version"]


def command_events(cp: ControlPlane, device_id: str, command_id: str, stage: str) -> list[dict]:
    return [
        e
        for e in cp.registry.events(device_id, limit=1000)
        if e.get("command_id") == command_id and e["stage"] == stage
    ]


async def test_retained_forged_chunk_does_not_block_rollouts(mosquitto, tmp_path) -> None:
    """One retained forgery used to fail every later rollout of that artifact."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=11)
        topic = topics.artifact_topic(v1.artifact_digest, "chunks")
        data = cp.registry.artifact_path(v1.artifact_digest).read_bytes()
        cfg = agent_config(tmp_path, "dev-ret", mosquitto, cp.signer.public_key_hex)
        async with attacker_link(mosquitto) as attacker:
            await attacker.publish(topic, forged_chunks(data, 1024)[0], retain=True)
            try:
                async with EdgeAgent(cfg) as agent:
                    await cp.wait_online([cfg.device_id])
                    state = await cp.roll_out("toy", "1", [cfg.device_id])
                    assert state["state"] == "succeeded", state
                    assert await local_version(agent) == "1"
                # Dropped for being retained, before any hash was even checked.
                assert not [
                    e for e in cp.registry.events(cfg.device_id) if e["stage"] == "chunk_rejected"
                ]
            finally:
                await attacker.publish(topic, b"", retain=True)  # clear the broker's store


async def test_forged_copies_racing_the_broadcast_never_win(mosquitto, tmp_path) -> None:
    """Forged copies of every chunk, sent again and again while the real broadcast runs."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=12)
        topic = topics.artifact_topic(v1.artifact_digest, "chunks")
        forged = forged_chunks(cp.registry.artifact_path(v1.artifact_digest).read_bytes(), 1024)
        configs = [
            agent_config(tmp_path, f"dev-race-{i}", mosquitto, cp.signer.public_key_hex)
            for i in range(3)
        ]
        ids = [c.device_id for c in configs]
        async with (
            attacker_link(mosquitto) as attacker,
            EdgeAgent(configs[0]) as a0,
            EdgeAgent(configs[1]) as a1,
            EdgeAgent(configs[2]) as a2,
        ):
            await cp.wait_online(ids)

            async def flood() -> None:
                while True:
                    for payload in forged:
                        await attacker.publish(topic, payload, qos=0)
                    await asyncio.sleep(0.01)

            flooding = asyncio.create_task(flood())
            try:
                state = await cp.roll_out("toy", "1", ids)
            finally:
                flooding.cancel()
                with suppress(asyncio.CancelledError):
                    await flooding
            assert state["state"] == "succeeded", state
            for agent in (a0, a1, a2):  # the real model passed its golden self-test
                assert await local_version(agent) == "1"
            rejected = 0
            for device_id, dev in state["devices"].items():
                n = len(command_events(cp, device_id, dev["command_id"], "chunk_rejected"))
                assert n <= MAX_REJECTION_EVENTS  # a flood of forgeries is not a flood of events
                rejected += n
            assert rejected > 0  # the forgeries did reach the agents


async def test_http_fallback_after_mqtt_digest_failure(mosquitto, tmp_path) -> None:
    """A package signed before chunk lists: forged chunks assemble into a wrong artifact;
    the agent notices the digest mismatch and fetches the artifact over HTTP."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=13)
        legacy = SignedManifest.sign(dataclasses.replace(v1.manifest, chunks=None), cp.signer)
        assert "chunks" not in legacy.to_dict()["manifest"]
        data = cp.registry.artifact_path(v1.artifact_digest).read_bytes()
        topic = topics.artifact_topic(v1.artifact_digest, "chunks")
        cfg = agent_config(
            tmp_path,
            "dev-fb",
            mosquitto,
            cp.signer.public_key_hex,
            cloud_token=issue_token(cp.signer, "dev-fb"),  # the artifact route asks for it
        )
        async with attacker_link(mosquitto) as attacker, EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            body = {
                "package": legacy.to_dict(),
                "artifact": {
                    "digest": v1.artifact_digest,
                    "size": v1.artifact_size,
                    "chunk_size": 1024,
                    "http_url": f"{cp.url}/api/artifacts/{v1.artifact_digest}",
                },
            }
            cid = await cp.send_command(cfg.device_id, body)
            await cp.wait_event(cfg.device_id, "downloading", command_id=cid)
            for payload in forged_chunks(data, 1024):
                await attacker.publish(topic, payload)
            done = await cp.final_event(cfg.device_id, cid)
            assert done["stage"] == "activated", done
            transports = [
                e.get("transport")
                for e in command_events(cp, cfg.device_id, cid, "downloading")
                if "progress" not in e  # the start of each transfer, not its progress
            ]
            assert transports == ["http", None]  # newest first: MQTT, then HTTP
            assert await local_version(agent) == "1"


async def test_repeated_repair_requests_resend_at_most_one_artifact(mosquitto, tmp_path) -> None:
    """20 requests for every chunk from one device id, spread over two seconds."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=14)
        count = chunking.chunk_count(v1.artifact_size, 1024)
        doc = {"device_id": "dev-greedy", "artifact": v1.artifact_digest}
        request = json.dumps({**doc, "missing": list(range(count))}).encode()
        topic = topics.repair_topic(v1.artifact_digest, "requests", "dev-greedy")
        before = cp.rollouts.stats["bytes_sent"]
        async with attacker_link(mosquitto) as attacker:
            for _ in range(20):
                await attacker.publish(topic, request)
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # let the control plane work through them
        sent = cp.rollouts.stats["bytes_sent"] - before
        assert 0 < sent <= v1.artifact_size + count * chunking.HEADER_SIZE
        assert cp.rollouts.stats["repair_requests_limited"] >= 17


async def test_huge_repair_request_is_dropped_and_the_api_stays_up(mosquitto, tmp_path) -> None:
    """A 9 MB request naming 1,000,000 chunks used to freeze the control plane's API."""
    async with ControlPlane(tmp_path / "control", mosquitto, chunk_size=64) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=15)
        huge = json.dumps(
            {"device_id": "dev-huge", "missing": list(range(1_000_000, 2_000_000))}
        ).encode()
        assert len(huge) > 8_000_000
        latencies: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    started = time.monotonic()
                    async with s.get(f"{cp.url}/api/health", timeout=aiohttp.ClientTimeout(5)) as r:
                        assert r.status == 200
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.05)

        probing = asyncio.create_task(probe())
        try:
            async with attacker_link(mosquitto) as attacker:
                for _ in range(3):
                    await attacker.publish(
                        topics.repair_topic(v1.artifact_digest, "requests", "dev-huge"), huge
                    )
                await asyncio.sleep(2.0)
        finally:
            stop.set()
            await probing
        assert len(latencies) > 10 and max(latencies) < 1.0, max(latencies)
        assert cp.rollouts.stats["repair_requests_dropped"] == 3
        assert cp.rollouts.stats["chunks_repaired"] == 0


async def test_http_is_the_fallback_when_repairs_are_refused(mosquitto, tmp_path) -> None:
    """No broadcast and every repair request over the limit: after its repair rounds the
    agent gives up on MQTT and fetches the artifact over HTTP."""
    cp = ControlPlane(tmp_path / "control", mosquitto)
    cp.settings = dataclasses.replace(cp.settings, repair=RepairPolicy(device_burst=0))
    async with cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=16)
        cfg = agent_config(
            tmp_path,
            "dev-norepair",
            mosquitto,
            cp.signer.public_key_hex,
            cloud_token=issue_token(cp.signer, "dev-norepair"),
            repair_rounds=3,  # to HTTP after 2.1 s of refused repairs, not 18.9 s
        )
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            body = {
                "package": v1.signed.to_dict(),
                "artifact": {
                    "digest": v1.artifact_digest,
                    "size": v1.artifact_size,
                    "http_url": f"{cp.url}/api/artifacts/{v1.artifact_digest}",
                },
            }
            cid = await cp.send_command(cfg.device_id, body)
            done = await cp.final_event(cfg.device_id, cid)
            assert done["stage"] == "activated", done
            transports = [
                e.get("transport")
                for e in command_events(cp, cfg.device_id, cid, "downloading")
                if "progress" not in e  # the start of each transfer, not its progress
            ]
            assert transports == ["http", None]
            assert cp.rollouts.stats["repair_requests_limited"] >= 1
            assert cp.rollouts.stats["chunks_repaired"] == 0
            assert await local_version(agent) == "1"
