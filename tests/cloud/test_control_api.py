"""The control plane's REST API over real HTTP: publish, models, artifacts, bad input."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from cloud.control_cli import ControlClient
from common.manifest import MANIFEST_FILE, write_unsigned
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package


def _unsigned_package(tmp_path, version: str = "1"):
    pkg = make_package(tmp_path / f"pkg-{version}", version=version, release=int(version))
    (pkg.directory / MANIFEST_FILE).unlink()
    write_unsigned(pkg.directory, pkg.manifest)
    return pkg


async def test_publish_over_http_signs_and_lists_the_model(mosquitto, tmp_path) -> None:
    pkg = _unsigned_package(tmp_path)
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        client = ControlClient(cp.url, token=cp.tokens["operator"])
        record = await asyncio.to_thread(client.publish, pkg.directory)
        assert (record["name"], record["version"], record["variant"]) == ("toy", "1", "edge")
        listed = (await asyncio.to_thread(client.get, "/api/models"))["models"]
        assert [m["version"] for m in listed] == ["1"]
        detail = await asyncio.to_thread(client.get, "/api/models/toy/versions/1")
        assert detail["signed_manifest"]["key_id"] == cp.signer.key_id
        with pytest.raises(RuntimeError, match=r"HTTP 409.*already exists"):
            await asyncio.to_thread(client.publish, pkg.directory)

        digest = record["artifact"]["digest"]
        async with aiohttp.ClientSession(headers=cp.auth("viewer")) as s:
            async with s.get(
                f"{cp.url}/api/artifacts/{digest}", headers={"Range": "bytes=10-19"}
            ) as resp:
                assert resp.status == 206
                full = cp.registry.artifact_path(digest).read_bytes()
                assert await resp.read() == full[10:20]
            async with s.get(f"{cp.url}/api/rollouts") as resp:
                assert (await resp.json()) == {"rollouts": []}
            async with s.get(f"{cp.url}/") as resp:
                assert resp.status == 200 and "Fogline control plane" in await resp.text()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/rollouts", b"{not json", 400),
        ("POST", "/api/rollouts", b'{"version": "1"}', 400),
        ("POST", "/api/rollouts", b'{"model": "nope", "version": "1"}', 404),
        ("POST", "/api/rollouts", b'{"model": "toy", "version": "1", "devices": "all"}', 400),
        ("POST", "/api/models", b"plain text", 400),
        ("GET", "/api/rollouts/unknown", None, 404),
        ("GET", "/api/artifacts/../../etc/passwd", None, 404),
        ("GET", "/api/artifacts/..%2F..%2Fetc%2Fpasswd", None, 400),
        ("GET", "/api/models/toy/versions/9", None, 404),
    ],
)
async def test_bad_requests_get_a_clear_4xx(mosquitto, tmp_path, method, path, body, status):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        async with aiohttp.ClientSession(headers=cp.auth("operator")) as s:
            async with s.request(method, cp.url + path, data=body) as resp:
                assert resp.status == status
                if resp.content_type == "application/json":
                    assert "error" in await resp.json()
            async with s.get(f"{cp.url}/api/health") as resp:  # still serving
                assert resp.status == 200


async def test_rollout_while_the_broker_is_down_is_a_503_not_a_hang(tmp_path) -> None:
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        async with ControlPlane(tmp_path / "control", broker) as cp:
            cp.publish_toy(tmp_path, "1")
            cp.registry.upsert_device("somewhere", {"state": "offline"})
            broker.stop()
            await asyncio.sleep(0.5)
            async with aiohttp.ClientSession(headers=cp.auth("operator")) as s:
                body = {"model": "toy", "version": "1", "devices": ["somewhere"]}
                async with s.post(f"{cp.url}/api/rollouts", json=body) as resp:
                    assert resp.status == 503
                    assert "not connected" in (await resp.json())["error"]
                async with s.get(f"{cp.url}/api/health") as resp:
                    assert (await resp.json())["broker_connected"] is False
    finally:
        broker.stop()


async def test_enrollment_issues_each_device_its_own_signed_token(mosquitto, tmp_path) -> None:
    from common.device_token import verify_token
    from common.signing import TrustStore

    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with aiohttp.ClientSession(headers=cp.auth("admin")) as s:
            async with s.post(f"{cp.url}/api/devices/cam-7/token") as resp:
                assert resp.status == 201
                token = (await resp.json())["token"]
            async with s.post(f"{cp.url}/api/devices/bad+id/token") as resp:
                assert resp.status == 400
        claims = verify_token(TrustStore([cp.signer.public_key_hex]), token)
        assert claims.device_id == "cam-7"
