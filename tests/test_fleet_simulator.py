"""The fleet simulator: devices that verify like agents, and the rollout benchmark on them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from bench.sim_agent import SimAgent
from common import topics
from common.messages import Command, sign_command
from common.signing import Signer, TrustStore
from tests.edge.agent_harness import ControlPlane


async def test_simulated_devices_roll_out_and_refuse_forged_commands(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        record = cp.publish_toy(tmp_path, "1")
        sims = [
            SimAgent(
                f"sim-{i}",
                host=mosquitto.host,
                port=mosquitto.port,
                trust=TrustStore([cp.signer.public_key_hex]),
                state_dir=tmp_path / "sims",
                chunk_timeout_s=0.3,
            )
            for i in range(3)
        ]
        async with sims[0], sims[1], sims[2]:
            ids = [s.device_id for s in sims]
            await cp.wait_online(ids)
            # A command signed by a key the devices do not trust is refused, never run.
            forged = Command("deploy", ids[0], 99, time.time() + 60, {"package": {}})
            await cp.rollouts.link.publish(
                topics.device_topic(ids[0], "commands"), sign_command(forged, Signer.generate())
            )
            state = await cp.roll_out("toy", "1", ids)
            assert state["state"] == "succeeded", state
            for sim in sims:
                assert sim.stats.activated.keys() == {record.artifact_digest}
                assert sim.stats.bytes_received == record.artifact_size
            assert sims[0].stats.refused == 1 and sims[0].stats.commands == 1
            devices = {d["device_id"]: d for d in cp.registry.devices()}
            assert devices[ids[1]]["models"] == [{"name": "toy", "version": "1"}]


def test_rollout_benchmark_reports_its_headline_keys(tmp_path) -> None:
    cmd = [sys.executable, "-m", "bench.rollout", "--json", "--size-mb", "1"]
    out = subprocess.run(
        [*cmd, "--agents", "3", "--processes", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["lost"] == 0
    assert set(result["ratio_to_raw"]) == {"3"} and result["ratio_to_raw"]["3"] > 0
    # One broadcast for three devices: about the artifact's size, not three times it.
    assert 1.0 <= result["bytes_sent_over_artifact_100"] < 1.5
    row = result["by_agents"]["3"]
    assert row["rollout_state"] == "succeeded" and row["fleet"]["activated"] == 3


@pytest.mark.slow
def test_fleet_scale_benchmark_survives_a_reconnect_storm() -> None:
    cmd = [sys.executable, "-m", "bench.fleet_scale", "--json", "--agents", "40"]
    out = subprocess.run(
        [*cmd, "--window", "5", "--ramp-s", "2", "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["lost"] == 0 and result["storm_converged_s"] > 0
    assert 0 < result["control_cpu_pct_of_one_core"] < 100
    assert result["api_p99_ms"] > 0
