"""``POST /api/rollouts`` with wrong types in its JSON body: 400, nothing started.

Red team: ``{"allow_downgrade": "false"}`` went through ``bool()`` and signed
commands that ALLOW a downgrade (any non-empty string is true); ``"model": 1``
or ``"version": 1`` went through ``str()`` and were taken as names.
"""

from __future__ import annotations

import aiohttp

from tests.edge.agent_harness import ControlPlane


async def test_wrong_types_in_a_rollout_request_are_400(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.registry.upsert_device("dev-1", {"state": "offline"})  # seen once: a known device
        good = {"model": "toy", "version": "1", "devices": ["dev-1"]}
        async with aiohttp.ClientSession(headers=cp.auth("operator")) as s:
            for bad in (
                {**good, "allow_downgrade": "false"},
                {**good, "allow_downgrade": 0},
                {**good, "allow_downgrade": None},
                {**good, "version": 1},
                {**good, "model": None},
                {**good, "model": ["toy"]},
            ):
                async with s.post(f"{cp.url}/api/rollouts", json=bad) as resp:
                    body = await resp.json()
                    assert resp.status == 400 and "error" in body, (bad, resp.status, body)
            assert cp.registry.rollouts() == []
            async with s.post(
                f"{cp.url}/api/rollouts", json={**good, "allow_downgrade": False}
            ) as r:
                assert r.status == 202


async def test_a_downgrade_needs_an_admin(mosquitto, tmp_path) -> None:
    """A stolen operator token cannot roll the fleet back to an old signed version."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.registry.upsert_device("dev-1", {"state": "offline"})
        doc = {"model": "toy", "version": "1", "devices": ["dev-1"], "allow_downgrade": True}
        url = f"{cp.url}/api/rollouts"
        async with (
            aiohttp.ClientSession(headers=cp.auth("operator")) as s,
            s.post(url, json=doc) as resp,
        ):
            assert resp.status == 403 and "admin" in (await resp.json())["error"]
        assert cp.registry.rollouts() == []
        async with (
            aiohttp.ClientSession(headers=cp.auth("admin")) as s,
            s.post(url, json=doc) as resp,
        ):
            assert resp.status == 202
