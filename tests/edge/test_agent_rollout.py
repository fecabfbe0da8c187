"""Agents and control plane over a real broker: rollout, tampering, truncation, outbox."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time

import aiohttp

from common import chunking, topics
from common.device_token import issue_token
from common.manifest import SignedManifest
from common.messages import Command, sign_command
from common.mqtt import MqttLink
from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.model_fixtures import make_package, v2_infer_body


async def infer(agent: EdgeAgent, rows: int = 1) -> dict:
    body = v2_infer_body(rows, **{"fogline.route": "local"})
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{agent.config.api_url}/v2/models/toy/infer", json=body) as resp,
    ):
        return {"status": resp.status, **(await resp.json())}


async def test_rollout_to_three_agents_activates_everywhere(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        configs = [
            agent_config(tmp_path, f"dev-{i}", mosquitto, cp.signer.public_key_hex)
            for i in range(3)
        ]
        async with (
            EdgeAgent(configs[0]) as a0,
            EdgeAgent(configs[1]) as a1,
            EdgeAgent(configs[2]) as a2,
        ):
            await cp.wait_online([c.device_id for c in configs])
            before = await infer(a0)
            assert before["status"] in (502, 503)  # no local model, no cloud: a clear error
            state = await cp.roll_out("toy", "1", [c.device_id for c in configs])
            assert state["state"] == "succeeded", state
            for agent in (a0, a1, a2):
                answer = await infer(agent)
                assert answer["status"] == 200
                assert answer["parameters"]["fogline.served_by"] == "edge"
                assert answer["parameters"]["fogline.model_version"] == "1"
            # Telemetry (router counters) reaches the control plane's fleet view.
            async with asyncio.timeout(10):
                while True:
                    dev = {d["device_id"]: d for d in cp.registry.devices()}["dev-0"]
                    if (dev.get("telemetry") or {}).get("router", {}).get("requests", 0) > 0:
                        break
                    await asyncio.sleep(0.1)
            listed = cp.registry.rollouts()
            assert [(r["state"], len(r["devices"])) for r in listed] == [("succeeded", 3)]
            # One broadcast served all three agents: chunks sent once, not three times.
            record = cp.registry.version("toy", "1")
            assert cp.rollouts.stats["chunks_broadcast"] == chunking.chunk_count(
                record.artifact_size, 1024
            )
        stages = [e["stage"] for e in reversed(cp.registry.events("dev-0"))]
        for stage in (
            "received",
            "downloading",
            "verified",
            "staged",
            "loaded",
            "self_tested",
            "activated",
        ):
            assert stage in stages


async def test_tampered_chunk_is_rejected_and_repaired(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        v2 = cp.publish_toy(tmp_path, "2", seed=1)
        cfg = agent_config(tmp_path, "dev-t", mosquitto, cp.signer.public_key_hex)
        async with (
            EdgeAgent(cfg) as agent,
            MqttLink(client_id="attacker", host=mosquitto.host, port=mosquitto.port) as attacker,
        ):
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            await attacker.wait_connected(5)
            # Drive the deployment by hand so the damaged chunk surely arrives first.
            cid = await _send_command(cp, cfg.device_id, _deploy_body(v2))
            await cp.wait_event(cfg.device_id, "downloading", command_id=cid)
            good = next(chunking.split(b"\0" * v2.artifact_size, 1024)).encode()
            bad = good[:-1] + bytes([good[-1] ^ 1])
            await attacker.publish(topics.artifact_topic(v2.artifact_digest, "chunks"), bad)
            rejected = await cp.wait_event(cfg.device_id, "chunk_rejected", command_id=cid)
            assert "SHA-256" in rejected["error"]
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"
            # The agent asks for what it still lacks; the control plane resends just that.
            done = await cp.final_event(cfg.device_id, cid)
            assert done["stage"] == "activated", done
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "2"


def _deploy_body(record, **extra) -> dict:
    artifact = {"digest": record.artifact_digest, "size": record.artifact_size, "chunk_size": 1024}
    return {"package": record.signed.to_dict(), "artifact": artifact, **extra}


async def _send_command(cp: ControlPlane, device_id: str, body: dict) -> str:
    cmd = Command("deploy", device_id, cp.registry.next_seq(device_id), time.time() + 60, body)
    await cp.rollouts.link.publish(
        topics.device_topic(device_id, "commands"), sign_command(cmd, cp.signer)
    )
    return cmd.id


async def test_bad_signature_and_truncated_artifact_keep_the_old_model(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        v2 = cp.publish_toy(tmp_path, "2", seed=1)
        # Giving up after 3 unanswered requests (2.1 s) rather than 10 (18.9 s).
        cfg = agent_config(tmp_path, "dev-b", mosquitto, cp.signer.public_key_hex, repair_rounds=3)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            # 1. A manifest whose signature does not match its content.
            forged = SignedManifest(
                dataclasses.replace(v2.manifest, release=7), v2.signed.signature, v2.signed.key_id
            )
            body = {**_deploy_body(v2), "package": forged.to_dict()}
            cid = await _send_command(cp, cfg.device_id, body)
            ev = await cp.final_event(cfg.device_id, cid)
            assert "signature" in ev["error"]
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"

            # 2. A truncated artifact: its chunks do not fit the size the manifest signs.
            good = cp.registry.artifact_path(v2.artifact_digest).read_bytes()
            ev = await _deploy_raw(cp, cfg.device_id, v2, good[:-100])
            assert "gave up" in ev["error"]
            assert (await cp.wait_event(cfg.device_id, "chunk_rejected"))["error"]

            # 3. Same length, every chunk self-consistent, but a file's bytes changed: the
            # changed chunk does not match the manifest's signed chunk list.
            flipped = bytearray(good)
            flipped[200] ^= 0xFF
            ev = await _deploy_raw(cp, cfg.device_id, v2, bytes(flipped))
            assert "gave up" in ev["error"]
            rejected = await cp.wait_event(
                cfg.device_id, "chunk_rejected", command_id=ev["command_id"]
            )
            assert "signed manifest" in rejected["error"]

            answer = await infer(agent)
            assert answer["status"] == 200
            assert answer["parameters"]["fogline.model_version"] == "1"


async def _deploy_raw(cp: ControlPlane, device_id: str, record, data: bytes) -> dict:
    """Deploy ``record``'s signed manifest but deliver ``data`` as its artifact."""
    digest = hashlib.sha256(data).hexdigest()  # unknown to the registry: no repair
    body = {
        "package": record.signed.to_dict(),
        "artifact": {"digest": digest, "size": len(data), "chunk_size": 1024},
    }
    cid = await _send_command(cp, device_id, body)
    await cp.wait_event(device_id, "downloading", command_id=cid)
    for chunk in chunking.split(data, 1024):
        await cp.rollouts.link.publish(topics.artifact_topic(digest, "chunks"), chunk.encode())
    return await cp.final_event(device_id, cid)


async def test_replayed_command_is_refused(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-r", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg):
            await cp.wait_online([cfg.device_id])
            body = {
                "package": v1.signed.to_dict(),
                "artifact": {
                    "digest": v1.artifact_digest,
                    "size": v1.artifact_size,
                    "chunk_size": 1024,
                },
            }
            cmd = Command("deploy", cfg.device_id, 5, time.time() + 60, body)
            payload = sign_command(cmd, cp.signer)
            topic = topics.device_topic(cfg.device_id, "commands")
            await cp.rollouts.link.publish(topic, payload)
            await cp.wait_event(cfg.device_id, "received")
            await cp.rollouts.link.publish(topic, payload)  # the same bytes again
            ev = await cp.wait_event(cfg.device_id, "rejected")
            assert "seq" in ev["error"]


async def test_events_survive_a_broker_outage(tmp_path) -> None:
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        got: list[dict] = []
        cfg = agent_config(tmp_path, "dev-o", broker, "00" * 32, telemetry_interval_s=600)
        async with EdgeAgent(cfg) as agent:
            await agent.link.wait_connected(10)
            broker.stop()
            # Long enough that paho's first reconnect attempt fails and it backs off, so
            # the watcher below is subscribed before the agent is back.
            await asyncio.sleep(1.5)
            for i in range(5):
                await agent.outbox.put(
                    topics.device_topic("dev-o", "events"), json.dumps({"n": i}).encode()
                )
            assert agent.outbox.pending() == 5  # kept on disk while the broker is away
            broker.start()
            async with MqttLink(client_id="watch", host=broker.host, port=broker.port) as w:
                w.subscribe(
                    topics.device_topic("dev-o", "events"), lambda t, p: got.append(json.loads(p))
                )
                await w.wait_connected(10)
                await asyncio.sleep(0.3)  # subscribed before the agent reconnects and drains
                await agent.outbox.flush(30)
                await asyncio.sleep(0.3)
        assert [g["n"] for g in got if "n" in g] == [0, 1, 2, 3, 4]
    finally:
        broker.stop()


async def test_signed_rollback_returns_to_the_previous_version(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "2", seed=1)
        cfg = agent_config(tmp_path, "dev-rb", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            for version in ("1", "2"):
                state = await cp.roll_out("toy", version, [cfg.device_id])
                assert state["state"] == "succeeded"
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "2"
            cmd = Command(
                "rollback", cfg.device_id, cp.registry.next_seq(cfg.device_id), time.time() + 60, {}
            )
            await cp.rollouts.link.publish(
                topics.device_topic(cfg.device_id, "commands"), sign_command(cmd, cp.signer)
            )
            done = await cp.final_event(cfg.device_id, cmd.id)
            assert (done["stage"], done["version"]) == ("activated", "1")
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"
        # and it stays rolled back across a restart
        async with EdgeAgent(cfg) as agent:
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"


async def test_signed_model_that_cannot_load_is_refused(mosquitto, tmp_path) -> None:
    """Signed and intact, but not a model ONNX Runtime can load: the old one keeps serving."""
    from common.manifest import file_entry

    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        pkg = make_package(tmp_path / "broken", version="2", release=2)
        pkg.model_path.write_bytes(b"this is not an ONNX model" * 20)
        files = [file_entry(pkg.directory / f.name, f.role) for f in pkg.manifest.files]
        cp.registry.publish(
            pkg.directory, dataclasses.replace(pkg.manifest, files=files), cp.signer
        )
        cfg = agent_config(tmp_path, "dev-x", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            state = await cp.roll_out("toy", "2", [cfg.device_id])
            assert state["state"] == "failed"
            assert "onnx" in state["devices"][cfg.device_id]["error"].lower()
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"
        async with EdgeAgent(cfg) as agent:  # and after a restart too
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"


async def test_device_offline_at_rollout_gets_the_model_when_it_returns(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-away", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg):
            await cp.wait_online([cfg.device_id])  # the broker now knows its session
        rollout = asyncio.create_task(cp.roll_out("toy", "1", [cfg.device_id]))
        await asyncio.sleep(1.0)  # the command waits at the broker
        async with EdgeAgent(cfg) as agent:
            state = await rollout
            assert state["state"] == "succeeded", state
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"


async def test_activation_drops_no_request(mosquitto, tmp_path) -> None:
    """Requests keep flowing while a new version is staged and switched in."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "2", seed=1)
        cfg = agent_config(tmp_path, "dev-live", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            stop = asyncio.Event()
            seen: list[tuple[int, str]] = []

            async def traffic() -> None:
                while not stop.is_set():
                    answer = await infer(agent)
                    seen.append((answer["status"], answer["parameters"]["fogline.model_version"]))

            clients = [asyncio.create_task(traffic()) for _ in range(4)]
            state = await cp.roll_out("toy", "2", [cfg.device_id])
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
        assert state["state"] == "succeeded"
        assert {status for status, _ in seen} == {200}
        versions = [v for _, v in seen]
        assert versions[0] == "1" and versions[-1] == "2"
        switch = versions.index("2")
        # Each client sees 1s then 2s; interleaved clients may finish a v1 request late.
        assert versions[switch:].count("1") <= len(clients)


async def test_http_transport_when_configured(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(
            tmp_path,
            "dev-http",
            mosquitto,
            cp.signer.public_key_hex,
            artifact_transport="http",
            cloud_token=issue_token(cp.signer, "dev-http"),  # opens /api/artifacts too
        )
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            state = await cp.roll_out("toy", "1", [cfg.device_id])
            assert state["state"] == "succeeded", state
            ev = await cp.wait_event(cfg.device_id, "downloading")
            assert ev["transport"] == "http"
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"
        assert not list((cfg.state_dir / "downloads").glob("*.part"))  # cleaned up


async def test_rollout_survives_a_control_plane_restart(mosquitto, tmp_path) -> None:
    """Commands out, then the control plane dies before the broadcast: on restart it
    resumes the rollout, and the events and chunk requests the broker kept catch it up."""
    # A persistent session needs a configured, stable client id.
    cp = ControlPlane(tmp_path / "control", mosquitto, mqtt_client_id="fogline-control-test-cr")
    async with cp:
        cp.publish_toy(tmp_path, "1")
        key = cp.signer.public_key_hex
    cfg = agent_config(tmp_path, "dev-cr", mosquitto, key, chunk_timeout_s=0.5)
    async with EdgeAgent(cfg) as agent:
        async with cp:
            await cp.wait_online([cfg.device_id])
            rollout_id = await cp.rollouts.start("toy", "1", [cfg.device_id])
        # The control plane is down now; the agent waits for chunks and asks for them.
        await asyncio.sleep(1.0)
        async with cp:
            async with asyncio.timeout(30):
                while cp.registry.rollout(rollout_id)["state"] == "running":
                    await asyncio.sleep(0.05)
            assert cp.registry.rollout(rollout_id)["state"] == "succeeded"
        assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"


async def test_deployment_rides_out_a_broker_restart(tmp_path) -> None:
    """The broker vanishes mid-download (losing its sessions); once it is back, the agent
    asks for the chunks it lacks, gets them, and activates."""
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        async with ControlPlane(tmp_path / "control", broker) as cp:
            v1 = cp.publish_toy(tmp_path, "1")
            cfg = agent_config(tmp_path, "dev-bk", broker, cp.signer.public_key_hex)
            async with EdgeAgent(cfg) as agent:
                await cp.wait_online([cfg.device_id])
                cid = await _send_command(cp, cfg.device_id, _deploy_body(v1))
                await cp.wait_event(cfg.device_id, "downloading", command_id=cid)
                broker.stop()  # before a single chunk was sent
                await asyncio.sleep(2.0)
                broker.start()
                done = await cp.final_event(cfg.device_id, cid)
                assert done["stage"] == "activated", done
                assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"
    finally:
        broker.stop()


async def test_rollout_with_the_control_plane_on_postgresql(mosquitto, tmp_path, postgres_url):
    async with ControlPlane(tmp_path / "control", mosquitto, database=postgres_url) as cp:
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-pg", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            state = await cp.roll_out("toy", "1", [cfg.device_id])
            assert state["state"] == "succeeded", state
            assert (await infer(agent))["parameters"]["fogline.model_version"] == "1"
    assert not (tmp_path / "control" / "control.sqlite").exists()  # it really used PostgreSQL
