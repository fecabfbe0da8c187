"""Red team: the device revocation list on the cloud fallback, attacked from the network.

A man in the middle (or a hostile control plane) on the fallback's link to the
control plane may replay answers it saw earlier, or answer slowly for ever.
Real servers on loopback: the control plane (``ControlPlane``), the fallback
(``build_fallback_app``) and, between them, a small aiohttp server that plays
the man in the middle with documents the real control plane signed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloud import package_cache
from cloud.enrollment import AgentSettings, enroll_device, revoke_device
from cloud.fallback import FallbackSettings, build_fallback_app
from common import topics
from common.mqtt import MqttLink
from common.revocations import Revocations, verify_revocations
from tests.cloud.test_device_revocation import _artifact
from tests.conftest import free_port
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package, v2_infer_body

KEYS_PATH = "/api/keys"
REVOCATIONS_PATH = "/api/device-revocations"


async def _get(cp: ControlPlane, path: str) -> Any:
    async with (
        aiohttp.ClientSession(headers=cp.auth("viewer")) as s,
        s.get(f"{cp.url}{path}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


@asynccontextmanager
async def _man_in_the_middle(
    answers: dict[str, Any], stall_first: bool = False
) -> AsyncIterator[tuple[str, Counter[str]]]:
    """Serves ``answers`` (path -> JSON) on loopback; with ``stall_first``, the first
    request to each path gets headers and then a byte now and then, for ever."""
    seen: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen[request.path] += 1
        if stall_first and seen[request.path] == 1:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            with suppress(ConnectionResetError):
                while True:  # until the client gives up and closes
                    await resp.write(b" ")
                    await asyncio.sleep(0.05)
            return resp
        return web.json_response(answers[request.path])

    app = web.Application()
    for path in answers:
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def _infer(client: TestClient, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1), headers=headers)
    return resp.status


def _settings(cp: ControlPlane, package: Path, control_url: str, cache: Path) -> FallbackSettings:
    return FallbackSettings(
        packages=[package],
        trusted_keys=[cp.signer.public_key_hex],
        control_url=control_url,
        control_token=cp.tokens["viewer"],
        device_tokens=True,
        key_refresh_s=0.05,
        cache_dir=cache,
    )


async def test_a_restarted_fallback_keeps_the_revocations_it_verified(
    mosquitto, tmp_path: Path
) -> None:
    """Red team: a fallback held the revocation list only in memory. Restarted while
    the control plane was out of reach, or behind a man in the middle replaying the
    list signed before the revocation (a valid signature, an older version), it
    served the revoked device again: nothing older than the held list was held."""
    workdir = tmp_path / "control"
    async with ControlPlane(workdir, mosquitto) as cp:
        package = make_package(tmp_path / "cloud", variant="cloud", signer=cp.signer).directory
        tokens = {d: enroll_device(workdir, d, AgentSettings())["cloud_token"] for d in "ab"}
        before = {
            KEYS_PATH: await _get(cp, KEYS_PATH),
            REVOCATIONS_PATH: await _get(cp, REVOCATIONS_PATH),
        }
        await asyncio.to_thread(revoke_device, workdir, "a")
        cache = tmp_path / "fallback-cache"
        app = await build_fallback_app(_settings(cp, package, cp.url, cache))
        async with TestClient(TestServer(app)) as fallback:
            assert await _infer(fallback, tokens["a"]) == 401
            assert await _infer(fallback, tokens["b"]) == 200
    # The control plane is gone; the fallback restarts behind a replaying man in the middle.
    async with _man_in_the_middle(before) as (url, seen):
        app = await build_fallback_app(_settings(cp, package, url, cache))
        async with TestClient(TestServer(app)) as fallback:
            async with asyncio.timeout(20):
                while seen[REVOCATIONS_PATH] < 3:  # the replay was offered, more than once
                    await asyncio.sleep(0.05)
            assert await _infer(fallback, tokens["a"]) == 401
            assert await _infer(fallback, tokens["b"]) == 200
    # And with no control plane at all.
    app = await build_fallback_app(_settings(cp, package, f"http://127.0.0.1:{free_port()}", cache))
    async with TestClient(TestServer(app)) as fallback:
        assert await _infer(fallback, tokens["a"]) == 401
        assert await _infer(fallback, tokens["b"]) == 200


async def test_a_stalling_control_plane_neither_stops_the_fallback_nor_its_refresher(
    mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team: a control plane (or a man in the middle) that sends headers and then a
    byte now and then made the fallback's fetch end in a bare TimeoutError (aiohttp's
    total timeout is no ClientError): at start it stopped the fallback from starting,
    and while serving it ended the refresh task for good, so no revocation was ever
    learnt again. The deadline is shortened here so the test does not wait minutes."""
    monkeypatch.setattr(package_cache, "CONTROL_TIMEOUT", aiohttp.ClientTimeout(total=0.5))
    workdir = tmp_path / "control"
    async with ControlPlane(workdir, mosquitto) as cp:
        package = make_package(tmp_path / "cloud", variant="cloud", signer=cp.signer).directory
        tokens = {d: enroll_device(workdir, d, AgentSettings())["cloud_token"] for d in "ab"}
        await asyncio.to_thread(revoke_device, workdir, "a")
        after = {
            KEYS_PATH: await _get(cp, KEYS_PATH),
            REVOCATIONS_PATH: await _get(cp, REVOCATIONS_PATH),
        }
    async with _man_in_the_middle(after, stall_first=True) as (url, seen):
        async with asyncio.timeout(60):  # a hang guard, far past the shortened deadline
            app = await build_fallback_app(_settings(cp, package, url, tmp_path / "cache"))
            async with TestClient(TestServer(app)) as fallback:
                assert await _infer(fallback, tokens["b"]) == 200
                while await _infer(fallback, tokens["a"]) == 200:
                    await asyncio.sleep(0.05)
                assert await _infer(fallback, tokens["a"]) == 401
    assert seen[REVOCATIONS_PATH] >= 2 and seen[KEYS_PATH] >= 2


async def test_a_revoked_device_leaves_the_fleet_and_is_not_heard_any_more(
    private_mosquitto, tmp_path: Path
) -> None:
    """Red team: revoking a device left it "online" for good. The broker keeps its
    retained online status (once its login is gone, its will may not be published), so
    every rollout to "all online devices" went on targeting it; and until the broker
    was reloaded, the events, telemetry and status its login still sent were taken."""
    workdir = tmp_path / "control"
    for device_id in ("gone", "kept"):
        enroll_device(workdir, device_id, AgentSettings())
    broker = private_mosquitto
    async with (
        ControlPlane(workdir, broker) as cp,
        MqttLink(client_id="devices", host=broker.host, port=broker.port) as link,
    ):
        await link.wait_connected(10)
        online = json.dumps({"state": "online"}).encode()
        for device_id in ("gone", "kept"):
            await link.publish(topics.device_topic(device_id, "status"), online, retain=True)
        await cp.wait_online(["gone", "kept"])
        await asyncio.to_thread(revoke_device, workdir, "gone")
        async with asyncio.timeout(20):
            while "gone" in cp.rollouts.online_devices():
                await asyncio.sleep(0.05)
        # Its login works until the broker is reloaded: nothing it says is taken.
        event = {"stage": "failed", "command_id": "x" * 32, "error": "spoof"}
        await link.publish(topics.device_topic("gone", "status"), online, retain=True)
        await link.publish(topics.device_topic("gone", "events"), json.dumps(event).encode())
        marker = {"stage": "failed", "command_id": "y" * 32, "error": "marker"}
        await link.publish(topics.device_topic("kept", "events"), json.dumps(marker).encode())
        async with asyncio.timeout(20):
            while not cp.registry.events("kept"):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # what "gone" sent first has had its chance
        assert cp.registry.events("gone") == []
        assert cp.rollouts.online_devices() == ["kept"]
        # Enrolled again, it is a device like any other.
        await asyncio.to_thread(enroll_device, workdir, "gone", AgentSettings())
        await link.publish(topics.device_topic("gone", "status"), online, retain=True)
        await cp.wait_online(["gone", "kept"])


async def test_a_device_revoked_on_one_replica_is_refused_by_every_replica(
    mosquitto, tmp_path: Path, postgres_url: str
) -> None:
    """Red team: replicas on one PostgreSQL each run on a WORKDIR of their own (the key
    lock is exclusive), and the revocation list was a file in one of them: a device
    revoked there kept downloading artifacts from the other replica, which also served
    fallbacks the list without it."""
    first, second = tmp_path / "a", tmp_path / "b"
    shared = {"database": postgres_url, "share_group": "control"}
    async with ControlPlane(first, mosquitto, **shared) as a:
        digest = a.publish_toy(tmp_path, "1").artifact_digest
        (second).mkdir()
        shutil.copytree(first / "keys", second / "keys")
        (second / "store").symlink_to(first / "store")
        token = enroll_device(first, "dev-r", AgentSettings())["cloud_token"]
        async with ControlPlane(second, mosquitto, **shared) as b:
            b.tokens = a.tokens  # one database: one set of operator tokens
            assert await _artifact(b, digest, token) == 200
            await asyncio.to_thread(revoke_device, first, "dev-r")
            assert await _artifact(a, digest, token) == 401
            async with asyncio.timeout(20):
                while await _artifact(b, digest, token) != 401:
                    await asyncio.sleep(0.1)
            served = verify_revocations(b.keys.trust, await _get(b, REVOCATIONS_PATH))
            assert served.revoked.keys() == {"dev-r"}
            assert served.version >= 1


def test_replicas_merging_their_lists_agree_and_never_go_back() -> None:
    one = Revocations().with_device("x", 10.0)  # version 1 on one replica's host
    other = Revocations().with_device("y", 20.0)  # version 1 on another's
    both = one.merged(other)
    assert both.version == 2 and both.revoked == {"x": 10.0, "y": 20.0}
    assert both.merged(one) is both and one.merged(both) is both  # nothing new: no new version
    again = one.with_device("x", 30.0)  # revoked again, later (after a re-enrollment)
    assert both.merged(again) == Revocations(3, {"x": 30.0, "y": 20.0})
