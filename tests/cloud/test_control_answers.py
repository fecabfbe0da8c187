"""The fallback reading a hostile control plane's JSON answers (a real server on loopback).

``GET /api/keys`` is fetched at start and every 5 minutes while the fallback
serves; the refresher survives only FoglineErrors. Red team: a 100,000-deep
JSON answer raised a bare RecursionError (the refresher task died, so keys
revoked later never reached the fallback), and an answer of any size was read
whole into memory before parsing.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cloud.package_cache import MAX_ANSWER_BYTES, fetch_keyrings, fetch_package
from common.errors import FoglineError


class Answers:
    """A control plane whose every JSON answer is ``body``; counts the bytes it got out."""

    def __init__(self, body: bytes | None = None, *, endless: bool = False) -> None:
        self.body, self.endless, self.sent = body, endless, 0
        app = web.Application()
        app.router.add_get("/api/keys", self._answer)
        app.router.add_get("/api/models/{name}/versions/{version}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if not self.endless:
            assert self.body is not None
            self.sent += len(self.body)
            return web.Response(body=self.body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)  # chunked: no Content-Length to refuse it by
        await resp.write(b'{"keyrings": [')
        block = b"0," * (1 << 19)
        try:
            while self.sent < 8 * MAX_ANSWER_BYTES:
                await resp.write(block)
                self.sent += len(block)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what the test wants
        return resp

    async def __aenter__(self) -> str:
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()


DEEP = b"[" * 100_000 + b"]" * 100_000


async def test_a_deeply_nested_keyring_answer_is_a_fogline_error() -> None:
    async with Answers(b'{"keyrings": ' + DEEP + b"}") as url:
        with pytest.raises(FoglineError):
            await fetch_keyrings(url, "fgo_x")


async def test_a_deeply_nested_model_answer_is_a_fogline_error(tmp_path) -> None:
    async with Answers(DEEP) as url:
        with pytest.raises(FoglineError):
            await fetch_package(url, "m", "1", variant="cloud", cache_dir=tmp_path)


async def test_an_endless_answer_is_cut_off() -> None:
    plane = Answers(endless=True)
    async with plane as url:
        with pytest.raises(FoglineError, match="bytes"):
            await fetch_keyrings(url, "fgo_x")
    assert plane.sent < 4 * MAX_ANSWER_BYTES  # the client stopped reading near the bound


async def test_an_answer_declared_too_large_is_not_read() -> None:
    plane = Answers(b'{"keyrings": [' + b"0," * (MAX_ANSWER_BYTES // 2) + b"0]}")
    async with plane as url:
        with pytest.raises(FoglineError, match="bytes"):
            await fetch_keyrings(url, "fgo_x")
