"""Slow: a larger fleet and repeated rollouts (``bash scripts/test.sh -m slow``)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from common import chunking
from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane, agent_config

pytestmark = pytest.mark.slow

AGENTS = 12
VERSIONS = 4


async def test_repeated_rollouts_to_a_dozen_agents(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto, chunk_size=512) as cp:
        records = [cp.publish_toy(tmp_path, str(v), seed=v) for v in range(1, VERSIONS + 1)]
        configs = [
            agent_config(tmp_path, f"scale-{i}", mosquitto, cp.signer.public_key_hex)
            for i in range(AGENTS)
        ]
        async with AsyncExitStack() as stack:
            agents = [await stack.enter_async_context(EdgeAgent(c)) for c in configs]
            ids = [c.device_id for c in configs]
            await cp.wait_online(ids, timeout=60)
            for record in records:
                state = await cp.roll_out("toy", record.manifest.version, ids, timeout=120)
                assert state["state"] == "succeeded", state
            assert {a.router.local_version for a in agents} == {str(VERSIONS)}
        # The broadcast cost is per artifact, not per device.
        expected = sum(chunking.chunk_count(r.artifact_size, 512) for r in records)
        assert cp.rollouts.stats["chunks_broadcast"] == expected
        # Repairs, if any, stay small next to sending each device its own copy.
        assert cp.rollouts.stats["chunks_repaired"] < expected * (AGENTS - 1)
