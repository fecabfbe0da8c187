"""Packages matched to hardware, with a real broker, a real control plane and devices.

Simulated devices (``bench.sim_agent``) stand for GPU devices: they report a GPU
with TensorRT, verify each package's signature, chunks and hardware target as the
agent does, and activate without running anything (TensorRT cannot run here). A
real agent is the device that lies: a forged status says it has a GPU it lacks.

Decided: a device that gets an engine its hardware cannot run refuses it before
downloading a byte and keeps serving its current model with ONNX Runtime; the
rollout records that device as failed, with the reason. The control plane does not
silently resend the ONNX package: a device whose report is false is news for an
operator. Once its status is true again, the next rollout sends it ONNX.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

from bench.sim_agent import SimAgent
from common import chunking, messages, topics
from common.hardware import TENSORRT, parse_hardware
from common.mqtt import MqttLink
from common.signing import TrustStore
from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.edge.staged_harness import api, served_version, wait_finished
from tests.engine_fixtures import engine_manifest
from tests.fogline_cli import fogline

ORIN = {"arch": "aarch64", "accelerator": "cuda", "gpu": "Orin (nvgpu)",
        "compute_capability": "8.7", "tensorrt_version": "10.3.0"}  # fmt: skip
XAVIER = {**ORIN, "gpu": "Xavier", "compute_capability": "7.2", "tensorrt_version": "8.5.2"}


def _publish(cp: ControlPlane, tmp_path, version: str, engines: list[tuple[str, str]]) -> None:
    """The ONNX package of ``version`` and an engine for each (compute capability, TRT)."""
    record = cp.publish_toy(tmp_path, version, seed=int(version))
    source = tmp_path / f"pkg-toy-{version}"
    for cc, trt in engines:
        out = tmp_path / f"engine-{version}-{cc}-{trt}"
        cp.registry.publish(out, engine_manifest(source, record.manifest, out, cc, trt), cp.signer)


def _row(cp: ControlPlane, device: str) -> dict:
    return next(d for d in cp.registry.devices() if d["device_id"] == device)


def _sim(cp: ControlPlane, broker, tmp_path, device: str, hardware: dict, gpu: bool) -> SimAgent:
    return SimAgent(
        device,
        host=broker.host,
        port=broker.port,
        trust=TrustStore([cp.signer.public_key_hex]),
        state_dir=tmp_path / "sims",
        chunk_timeout_s=0.3,
        hardware=parse_hardware(hardware),
        runtimes=("onnxruntime", TENSORRT) if gpu else ("onnxruntime",),
    )


async def test_each_device_gets_the_package_its_hardware_runs(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        _publish(cp, tmp_path, "1", [("8.7", "10.3.0"), ("8.9", "10.3.0")])
        tag = uuid.uuid4().hex[:6]  # the broker outlives the test: its retained statuses too
        sims = [
            _sim(cp, mosquitto, tmp_path, f"orin-{tag}", ORIN, gpu=True),
            _sim(cp, mosquitto, tmp_path, f"xavier-{tag}", XAVIER, gpu=True),  # no engine for it
            _sim(cp, mosquitto, tmp_path, f"pi-{tag}", {"arch": "aarch64"}, gpu=False),
            _sim(cp, mosquitto, tmp_path, f"box-{tag}", {"arch": "x86_64"}, gpu=False),
        ]
        async with sims[0], sims[1], sims[2], sims[3]:
            ids = [s.device_id for s in sims]
            name = {s.device_id: s.device_id.split("-")[0] for s in sims}
            await cp.wait_online(ids)
            state = await cp.roll_out("toy", "1", ids)
            assert state["state"] == "succeeded", state
            got = {name[d]: s["package"] for d, s in state["devices"].items()}
            assert got == {"orin": "trt-cc8.7-10.3", "xavier": "onnx", "pi": "onnx", "box": "onnx"}
            # What each device verified and activated is the package it was recorded for.
            formats = {
                name[d]: next(e for e in cp.registry.events(d) if e["stage"] == "activated")[
                    "format"
                ]
                for d in ids
            }
            assert formats == {"orin": "tensorrt", "xavier": "onnx", "pi": "onnx", "box": "onnx"}
            engine = cp.registry.packages("toy", "1")["trt-cc8.7-10.3"]
            assert sims[0].stats.activated.keys() == {engine.artifact_digest}

            # A staged rollout of the next version: the same choice, per device, in its
            # status over the API and in `fogline rollout status` and `fogline control rollout`.
            _publish(cp, tmp_path, "2", [("7.2", "8.5.2")])
            status, created = await api(
                cp, "POST", "/api/staged-rollouts",
                {"model": "toy", "version": "2", "to": ",".join(ids), "stages": "100%",
                 "soak": "0s"},
            )  # fmt: skip
            assert status == 201, created
            done = await wait_finished(cp, created["id"])
            assert done["state"] == "succeeded", done
            packages = {name[d["device_id"]]: d["package"] for d in done["devices"]}
            assert packages == {"orin": "onnx", "xavier": "trt-cc7.2-8.5", "pi": "onnx",
                                "box": "onnx"}  # fmt: skip
            env = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["viewer"]}
            shown = await asyncio.to_thread(fogline, "rollout", "status", created["id"], env=env)
            assert shown.returncode == 0, shown.stderr
            rows = {line.split()[0]: line.split()[1:4] for line in shown.stdout.splitlines()[4:]}
            assert "PACKAGE" in shown.stdout
            assert rows[f"xavier-{tag}"] == ["1", "active", "trt-cc7.2-8.5"]
            assert rows[f"box-{tag}"] == ["1", "active", "onnx"]
            shown = await asyncio.to_thread(fogline, "model", "show", "toy:1", env=env)
            assert shown.returncode == 0, shown.stderr
            engines = shown.stdout.split("TensorRT engines")[1].splitlines()[2:]
            assert [line.split()[:4] for line in engines] == [
                ["1", "trt-cc8.7-10.3", "fp16", "any"],
                ["1", "trt-cc8.9-10.3", "fp16", "any"],
            ]
            child = cp.registry.staged.get(created["id"])["child_id"]
            plain = await asyncio.to_thread(
                fogline, "control", "rollout", child, "--control", cp.url, env=env
            )
            assert plain.returncode == 0, plain.stderr
            assert any(
                line.split()[:2] == [f"xavier-{tag}", "trt-cc7.2-8.5"]
                for line in plain.stdout.splitlines()
            ), plain.stdout


async def test_a_device_claiming_a_gpu_it_lacks_refuses_the_engine(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        _publish(cp, tmp_path, "1", [])
        liar = f"liar-{uuid.uuid4().hex[:6]}"
        config = agent_config(tmp_path, liar, mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(config) as agent:
            await cp.wait_online([liar])
            row = _row(cp, liar)
            assert row["hardware"]["arch"] and row["hardware"].get("accelerator") == "cpu"
            assert (await cp.roll_out("toy", "1", [liar]))["state"] == "succeeded"
            _publish(cp, tmp_path, "2", [("8.7", "10.3.0")])

            # The forged status: a Jetson Orin with TensorRT, on the device's own topic.
            forged = json.loads(agent._status(True))
            forged.update(hardware=ORIN, runtimes=["onnxruntime", TENSORRT])
            async with MqttLink(client_id="forger", host=mosquitto.host, port=mosquitto.port) as ml:
                await ml.wait_connected(10)
                await ml.publish(
                    topics.device_topic(liar, "status"), json.dumps(forged).encode(), retain=True
                )
            async with asyncio.timeout(15):
                while _row(cp, liar)["hardware"].get("compute_capability") != "8.7":
                    await asyncio.sleep(0.05)

            state = await cp.roll_out("toy", "2", [liar])
            assert state["state"] == "failed", state
            dev = state["devices"][liar]
            assert dev["package"] == "trt-cc8.7-10.3" and dev["stage"] == "failed"
            assert dev["error"].startswith("TargetMismatchError: refused the TensorRT engine")
            assert "no CUDA GPU with TensorRT" in dev["error"]
            assert "still serving with ONNX Runtime" in dev["error"]
            stages = [
                e["stage"]
                for e in reversed(cp.registry.events(liar, limit=50))
                if e.get("command_id") == dev["command_id"]
            ]
            assert stages == ["received", messages.FAILED]  # refused before any download
            assert await served_version(agent) == "1"  # ONNX Runtime serves on

            # Its true status again (what it says at every reconnect): ONNX, and it works.
            await agent.publish_status()
            async with asyncio.timeout(15):
                while _row(cp, liar)["hardware"].get("accelerator") != "cpu":
                    await asyncio.sleep(0.05)
            state = await cp.roll_out("toy", "2", [liar])
            assert state["state"] == "succeeded", state
            assert state["devices"][liar]["package"] == "onnx"
            assert await served_version(agent) == "2"


async def test_a_restarted_control_plane_broadcasts_each_device_its_package(
    mosquitto, tmp_path
) -> None:
    """The control plane stops right after sending the commands; the next one (same
    database, same persistent MQTT session) resumes the rollout and broadcasts exactly
    the packages its devices were sent: here two engines, and not the ONNX package."""
    tag = uuid.uuid4().hex[:6]
    workdir, session = tmp_path / "control", f"control-{tag}"
    async with contextlib.AsyncExitStack() as stack:
        cp = ControlPlane(workdir, mosquitto, mqtt_client_id=session)
        await cp.__aenter__()
        try:
            _publish(cp, tmp_path, "1", [("8.7", "10.3.0"), ("7.2", "8.5.2")])
            packages = cp.registry.packages("toy", "1")
            sims = [
                _sim(cp, mosquitto, tmp_path, f"orin-{tag}", ORIN, gpu=True),
                _sim(cp, mosquitto, tmp_path, f"xavier-{tag}", XAVIER, gpu=True),
            ]
            for sim in sims:
                sim.chunk_timeout_s = 2.0  # patient enough to outlast the restart
                await stack.enter_async_context(sim)
            ids = [s.device_id for s in sims]
            await cp.wait_online(ids)
            rollout_id = await cp.rollouts.start("toy", "1", ids)
        finally:
            await cp.__aexit__(None, None, None)  # gone before any chunk went out
        async with ControlPlane(workdir, mosquitto, mqtt_client_id=session) as cp2:
            async with asyncio.timeout(60):
                while cp2.registry.rollout(rollout_id)["state"] == "running":
                    await asyncio.sleep(0.1)
            state = cp2.registry.rollout(rollout_id)
            assert state["state"] == "succeeded", state
            got = {d.split("-")[0]: s["package"] for d, s in state["devices"].items()}
            assert got == {"orin": "trt-cc8.7-10.3", "xavier": "trt-cc7.2-8.5"}
            engines = [packages["trt-cc8.7-10.3"], packages["trt-cc7.2-8.5"]]
            expected = sum(
                chunking.chunk_count(r.artifact_size, cp2.rollouts.chunk_size(r)) for r in engines
            )
            assert cp2.rollouts.stats["chunks_broadcast"] == expected
            assert sims[0].stats.activated.keys() == {engines[0].artifact_digest}
            assert sims[1].stats.activated.keys() == {engines[1].artifact_digest}
