"""The fallback follows a real control plane: publications over HTTP, a real fallback
process under steady traffic, the V2 repository API and its attacks."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from cloud.control_client import ControlApi
from cloud.fallback import FallbackSettings, build_fallback_app
from common.device_token import issue_token
from common.manifest import MANIFEST_FILE, write_unsigned
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package, v2_infer_body
from tests.server_processes import start_fallback_with


async def publish(cp: ControlPlane, tmp: Path, version: str) -> dict[str, Any]:
    """Publish toy ``version`` (cloud variant) the way an operator does: over HTTP,
    unsigned, so the control plane signs it."""
    pkg = make_package(
        tmp / f"toy-{version}",
        version=version,
        release=int(version),
        variant="cloud",
        seed=int(version),
    )
    (pkg.directory / MANIFEST_FILE).unlink()
    write_unsigned(pkg.directory, pkg.manifest)
    async with ControlApi(cp.url, token=cp.tokens["operator"]) as api:
        return await api.publish(pkg.directory)


def post_infer(url: str, path: str = "/v2/models/toy/infer") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(v2_infer_body(1)).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Traffic:
    """Steady requests from a thread; records each answer's status and version."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[int, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                status, doc = post_infer(self.url)
            except OSError as exc:  # connection refused or reset: a failure too
                self.answers.append((0, repr(exc)))
                continue
            self.answers.append((status, doc.get("model_version")))

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


async def wait_for_version(traffic: Traffic, version: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not traffic.answers or traffic.answers[-1][1] != version:
            await asyncio.sleep(0.05)


async def test_a_fallback_process_switches_versions_as_they_are_published(
    mosquitto, tmp_path: Path
) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        await publish(cp, tmp_path, "1")
        env = {
            "FOGLINE_FALLBACK_CONTROL": cp.url,
            "FOGLINE_FALLBACK_CONTROL_TOKEN": cp.tokens["viewer"],
            "FOGLINE_FALLBACK_TRUST_KEY": cp.signer.public_key_hex,
            "FOGLINE_FALLBACK_POLL_S": "0.2",
            "FOGLINE_FALLBACK_KEEP_VERSIONS": "2",
            "FOGLINE_FALLBACK_CACHE_DIR": str(tmp_path / "cache"),
        }
        server = await asyncio.to_thread(start_fallback_with, tmp_path, "--models", "to*", env=env)
        try:
            with Traffic(server.url) as traffic:
                await wait_for_version(traffic, "1")
                await publish(cp, tmp_path, "2")
                await wait_for_version(traffic, "2")
                await publish(cp, tmp_path, "3")
                await wait_for_version(traffic, "3")
                await asyncio.sleep(0.3)  # a little traffic on 3 as well
            statuses = {status for status, _ in traffic.answers}
            assert statuses == {200}, [a for a in traffic.answers if a[0] != 200][:5]
            seen = [v for _, v in traffic.answers]
            assert seen == sorted(seen, key=int)  # never back to an older version
            # keep 2: version 2 still answers by number, version 1 is gone.
            status, doc = await asyncio.to_thread(
                post_infer, server.url, "/v2/models/toy/versions/2/infer"
            )
            assert status == 200 and doc["model_version"] == "2"
            assert doc["parameters"]["fogline.model_version"] == "2"
            status, _ = await asyncio.to_thread(
                post_infer, server.url, "/v2/models/toy/versions/1/infer"
            )
            assert status == 404
        finally:
            server.stop()
        assert server.proc.returncode == 0


@pytest.fixture
async def plane(mosquitto, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        yield cp


async def serving(cp: ControlPlane, tmp: Path, **kw: Any) -> TestClient:
    settings = FallbackSettings(
        control_url=cp.url,
        control_token=cp.tokens["viewer"],
        trusted_keys=[cp.signer.public_key_hex],
        cache_dir=tmp / "cache",
        device_tokens=True,
        poll_s=3600,  # in these tests only an operator's load picks a new version up
        **kw,
    )
    client = TestClient(TestServer(await build_fallback_app(settings), host="127.0.0.1"))
    await client.start_server()
    return client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def version_served(client: TestClient, headers: dict[str, str]) -> str:
    resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1), headers=headers)
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["model_version"])


async def test_repository_api_load_unload_and_its_attacks(plane: ControlPlane, tmp_path: Path):
    cp = plane
    await publish(cp, tmp_path, "1")
    client = await serving(cp, tmp_path)
    device = bearer(issue_token(cp.signer, "dev-1"))
    operator = bearer(cp.tokens["operator"])
    try:
        assert await version_served(client, device) == "1"
        await publish(cp, tmp_path, "2")
        load = "/v2/repository/models/toy/load"
        # Who may load: not a caller without a token, a device, a viewer, a made-up token.
        for headers, status in [
            ({}, 401),
            (device, 403),
            (bearer(cp.tokens["viewer"]), 403),
            (bearer("fgo_" + "x" * 43), 401),
        ]:
            resp = await client.post(load, headers=headers)
            assert resp.status == status, (headers, await resp.text())
            assert "error" in await resp.json()
        assert await version_served(client, device) == "1"  # nothing moved
        resp = await client.post(load, headers=operator)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["version"] == "2"
        assert await version_served(client, device) == "2"
        # The index: both versions loaded, latest first; the ready filter.
        resp = await client.post("/v2/repository/index", json={"ready": True}, headers=device)
        assert [(e["name"], e["version"]) for e in await resp.json()] == [
            ("toy", "2"),
            ("toy", "1"),
        ]
        resp = await client.get("/v2/models/toy", headers=device)
        assert (await resp.json())["versions"] == ["2", "1"]
        # Bad names and unknown models.
        bad = URL(
            f"http://{client.host}:{client.port}/v2/repository/models/%2E%2E%2Fx/load",
            encoded=True,
        )
        async with client.session.post(bad, headers=operator) as resp:
            assert resp.status == 400, await resp.text()
        resp = await client.post("/v2/repository/models/nope/load", headers=operator)
        assert resp.status == 404
        resp = await client.post("/v2/repository/index", json={"ready": "yes"}, headers=device)
        assert resp.status == 400
        # A tampered package: refused, and the version before it keeps serving.
        record = await publish(cp, tmp_path, "3")
        artifact = cp.registry.artifact_path(record["artifact"]["digest"])
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0xFF
        artifact.write_bytes(bytes(data))
        resp = await client.post(load, headers=operator)
        assert resp.status == 400 and "digest" in (await resp.json())["error"], await resp.text()
        assert await version_served(client, device) == "2"
        # The index is for callers of the V2 API: without a token, 401 (GET and POST).
        assert (await client.get("/v2/repository/index")).status == 401
        assert (await client.post("/v2/repository/index", json={})).status == 401
        index = await (await client.get("/v2/repository/index", headers=device)).json()
        assert {"name": "toy", "version": "3", "state": "UNAVAILABLE"}.items() <= {
            **next(e for e in index if e.get("version") == "3")
        }.items()
        # Unload: gone until loaded again (the poll does not bring it back).
        for headers in ({}, device, bearer(cp.tokens["viewer"])):  # 401, 403, 403
            resp = await client.post("/v2/repository/models/toy/unload", headers=headers)
            assert resp.status == (401 if not headers else 403)
        resp = await client.post("/v2/repository/models/toy/unload", headers=operator)
        assert resp.status == 200
        resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1), headers=device)
        assert resp.status == 404
        assert (await client.get("/v2/health/ready")).status == 503
        # Loaded again: its latest (3) is still refused, so the load says so, and the
        # versions that verify (2, 1) serve.
        resp = await client.post(load, headers=operator)
        assert resp.status == 400 and "digest" in (await resp.json())["error"]
        assert await version_served(client, device) == "2"
        assert (await client.get("/v2/health/ready")).status == 200
    finally:
        await client.close()


async def test_index_and_versions_without_auth_configured(plane: ControlPlane, tmp_path: Path):
    """An open fallback (no tokens) still wants an operator for load/unload."""
    cp = plane
    await publish(cp, tmp_path, "1")
    settings = FallbackSettings(
        control_url=cp.url,
        control_token=cp.tokens["viewer"],
        trusted_keys=[cp.signer.public_key_hex],
        cache_dir=tmp_path / "cache",
        poll_s=3600,
    )
    async with TestClient(TestServer(await build_fallback_app(settings))) as client:
        assert await version_served(client, {}) == "1"
        resp = await client.post("/v2/repository/models/toy/unload")
        assert resp.status == 401
        resp = await client.post("/v2/repository/models/toy/unload", headers=bearer("anything"))
        assert resp.status == 403
        resp = await client.get("/v2/repository/index")
        assert [e["state"] for e in await resp.json()] == ["READY"]


async def test_model_list_polls_cost_a_304_until_something_is_published(
    plane: ControlPlane, tmp_path: Path
) -> None:
    from cloud.package_cache import list_models

    cp = plane
    await publish(cp, tmp_path, "1")
    models, etag = await list_models(cp.url, cp.tokens["viewer"])
    assert [m["version"] for m in models or []] == ["1"] and etag
    assert await list_models(cp.url, cp.tokens["viewer"], etag) == (None, etag)
    await publish(cp, tmp_path, "2")
    models, new_etag = await list_models(cp.url, cp.tokens["viewer"], etag)
    assert [m["version"] for m in models or []] == ["1", "2"] and new_etag != etag
