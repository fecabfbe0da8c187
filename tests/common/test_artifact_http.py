"""HTTP artifact transport against a real aiohttp server on loopback."""

from __future__ import annotations

import hashlib
import os

import aiohttp
import pytest
from aiohttp import web

from common.artifact_http import fetch_artifact
from common.errors import CloudUnavailableError, VerificationError

DATA = os.urandom(300_000)
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
async def server(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(DATA)
    seen: list[str | None] = []

    async def artifact(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Range"))
        return web.FileResponse(blob)

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(20):  # far more than the signed size
            await resp.write(DATA)
        return resp

    app = web.Application()
    app.router.add_get("/a", artifact)
    app.router.add_get("/endless", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_download_and_resume_with_range(server, tmp_path) -> None:
    base, seen = server
    partial = tmp_path / "x.part"
    partial.write_bytes(DATA[:123_456])  # what a killed agent left behind
    async with aiohttp.ClientSession() as s:
        data = await fetch_artifact(s, f"{base}/a", size=len(DATA), digest=DIGEST, partial=partial)
    assert data == DATA
    assert seen == ["bytes=123456-"]


async def test_corrupt_partial_is_dropped_and_fetched_again(server, tmp_path) -> None:
    base, seen = server
    partial = tmp_path / "x.part"
    partial.write_bytes(b"\0" * 1000)
    async with aiohttp.ClientSession() as s:
        data = await fetch_artifact(s, f"{base}/a", size=len(DATA), digest=DIGEST, partial=partial)
    assert data == DATA
    assert seen == ["bytes=1000-", None]


async def test_transfer_stops_at_the_signed_size(server, tmp_path) -> None:
    base, _ = server
    partial = tmp_path / "x.part"
    async with aiohttp.ClientSession() as s:
        data = await fetch_artifact(
            s, f"{base}/endless", size=len(DATA), digest=DIGEST, partial=partial
        )
    assert data == DATA and partial.stat().st_size == len(DATA)


async def test_wrong_digest_and_missing_artifact_are_clear_errors(server, tmp_path) -> None:
    base, _ = server
    async with aiohttp.ClientSession() as s:
        with pytest.raises(VerificationError, match="digest"):
            await fetch_artifact(
                s,
                f"{base}/a",
                size=len(DATA),
                digest="0" * 64,
                partial=tmp_path / "y.part",
                attempts=2,
            )
        with pytest.raises(CloudUnavailableError, match="404"):
            await fetch_artifact(
                s, f"{base}/nope", size=10, digest="0" * 64, partial=tmp_path / "z.part", attempts=2
            )
