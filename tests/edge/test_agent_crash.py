"""SIGKILL an agent process at every step of an activation; it always restarts serving
a complete model (old or new), never a half-written one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp

from common.device_token import issue_token
from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.model_fixtures import v2_infer_body

STAGES = ["downloading", "verified", "staged", "loaded", "self_tested", "activated"]


def start_agent(config_path, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fogline", "edge", "run", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def served_version(url: str, timeout: float = 30, model: str = "toy") -> str:
    body = v2_infer_body(1, **{"fogline.route": "local"})
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.post(f"{url}/v2/models/{model}/infer", json=body) as resp:
                    if resp.status == 200:
                        return (await resp.json())["parameters"]["fogline.model_version"]
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"agent at {url} never served a model")


async def test_sigkill_during_activation_leaves_a_loadable_model(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cfg = agent_config(tmp_path, "dev-k", mosquitto, cp.signer.public_key_hex)
        config_path = tmp_path / "agent.json"
        config_path.write_text(json.dumps(cfg.to_dict()))
        log = (tmp_path / "agent.log").open("ab")
        cp.publish_toy(tmp_path, "1")
        proc = start_agent(config_path, log)
        try:
            await cp.wait_online([cfg.device_id], timeout=30)
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            versions = {"1"}
            for n, stage in enumerate(STAGES, start=2):
                cp.publish_toy(tmp_path, str(n), seed=n)
                rollout = asyncio.create_task(cp.rollouts.start("toy", str(n), [cfg.device_id]))
                await rollout
                await wait_stage(cp, cfg.device_id, stage, since_version=str(n))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                if n == 2:  # the broker publishes the agent's will: the fleet sees it offline
                    await wait_state(cp, cfg.device_id, "offline")
                proc = start_agent(config_path, log)
                version = await served_version(cfg.api_url)
                # Old or new, never anything else, and it answers.
                assert version in {str(n - 1), str(n)} | versions, (stage, version)
                versions.add(str(n))
                await cp.wait_online([cfg.device_id], timeout=30)
                # Bring the agent to version n before the next round, so "old" is well defined.
                if version != str(n):
                    state = await cp.roll_out("toy", str(n), [cfg.device_id])
                    assert state["state"] == "succeeded", state
                assert await served_version(cfg.api_url) == str(n)
        finally:
            proc.kill()
            proc.wait()
            log.close()


async def wait_state(cp: ControlPlane, device_id: str, state: str) -> None:
    async with asyncio.timeout(10):
        while {d["device_id"]: d for d in cp.registry.devices()}[device_id]["state"] != state:
            await asyncio.sleep(0.05)


async def wait_stage(cp: ControlPlane, device_id: str, stage: str, since_version: str) -> None:
    """Wait until the agent reported ``stage`` for the rollout of ``since_version``."""
    async with asyncio.timeout(30):
        while True:
            events = cp.registry.events(device_id, limit=50)
            started = [
                e
                for e in events
                if e.get("stage") == "received" and e.get("version") == since_version
            ]
            if started:
                cid = started[0]["command_id"]
                if any(
                    e.get("command_id") == cid and e["stage"] in (stage, "activated", "failed")
                    for e in events
                ):
                    return
            await asyncio.sleep(0.01)


async def test_sigkill_mid_download_then_restart_resumes_the_deploy(mosquitto, tmp_path) -> None:
    """Issue 8: the agent acknowledged the command at the broker, died mid-download and,
    restarted, never ran it again; the rollout sat until its 300 s timeout.

    A second target (an in-process agent, offline when the rollout starts) holds the
    broadcast back, so the SIGKILL lands before a single chunk has come in.
    """
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        key = cp.signer.public_key_hex
        cp.publish_toy(tmp_path, "1")
        late = agent_config(tmp_path, "dev-late", mosquitto, key)
        async with EdgeAgent(late):  # a persistent session at the broker, then offline
            await cp.wait_online([late.device_id])
        # As enrolled: a device token for the HTTP fallback, a chunk timeout that outlasts
        # the control plane's repair limit (one artifact per 10 s) over its 10 rounds.
        token = issue_token(cp.signer, "dev-r")
        cfg = agent_config(tmp_path, "dev-r", mosquitto, key, cloud_token=token, chunk_timeout_s=2)
        config_path = tmp_path / "agent.json"
        config_path.write_text(json.dumps(cfg.to_dict()))
        log = (tmp_path / "agent.log").open("ab")
        proc = start_agent(config_path, log)
        try:
            await cp.wait_online([cfg.device_id], timeout=30)
            rollout_id = await cp.rollouts.start("toy", "1", [cfg.device_id, late.device_id])
            await wait_stage(cp, cfg.device_id, "downloading", since_version="1")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            stage = cp.registry.rollout(rollout_id)["devices"][cfg.device_id]["stage"]
            assert stage == "downloading", stage  # killed mid-download, nothing downloaded
            proc = start_agent(config_path, log)
            async with EdgeAgent(late):
                deadline = time.monotonic() + 60  # the rollout's own timeout is 300 s
                while cp.registry.rollout(rollout_id)["state"] == "running":
                    assert time.monotonic() < deadline, cp.registry.rollout(rollout_id)
                    await asyncio.sleep(0.1)
            assert cp.registry.rollout(rollout_id)["state"] == "succeeded"
            assert await served_version(cfg.api_url) == "1"
            assert not list((cfg.state_dir / "pending").glob("*.json"))  # done: forgotten
        finally:
            proc.kill()
            proc.wait()
            log.close()


async def test_sigkill_while_one_model_updates_restarts_serving_both(mosquitto, tmp_path):
    """Two models on one agent process; SIGKILL while the second one's update is staged:
    the restarted agent serves both, each complete (the updated one old or new)."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cfg = agent_config(tmp_path, "dev-k2", mosquitto, cp.signer.public_key_hex)
        config_path = tmp_path / "agent.json"
        config_path.write_text(json.dumps(cfg.to_dict()))
        log = (tmp_path / "agent.log").open("ab")
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "1", name="beta", seed=2)
        cp.publish_toy(tmp_path, "2", name="beta", seed=3)
        proc = start_agent(config_path, log)
        try:
            await cp.wait_online([cfg.device_id], timeout=30)
            for name in ("toy", "beta"):
                state = await cp.roll_out(name, "1", [cfg.device_id])
                assert state["state"] == "succeeded", state
            await cp.rollouts.start("beta", "2", [cfg.device_id])
            await wait_stage(cp, cfg.device_id, "staged", since_version="2")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc = start_agent(config_path, log)
            assert await served_version(cfg.api_url) == "1"
            assert await served_version(cfg.api_url, model="beta") in {"1", "2"}
        finally:
            proc.kill()
            proc.wait()
            log.close()
