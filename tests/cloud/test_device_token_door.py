"""Hostile device tokens at the two doors that take them: the fallback and the
control plane's artifact route. Anyone on the network can send one.

Red team: a token whose payload is 5,000 nested ``[`` (6.7 KB, under the 8 KB
header limit) raised a bare RecursionError inside ``verify_token``: 500 on
both servers, for a caller with no credentials at all.
"""

from __future__ import annotations

import base64
import json

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from cloud.fallback import FallbackSettings, build_fallback_app
from common.signing import Signer
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package, v2_infer_body


def _token(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode().rstrip("=") + "." + "00" * 64


HOSTILE = [
    _token(b"[" * 5000),
    _token(b'{"device_id": ' + b"[" * 4000 + b"}"),
    _token(b'{"device_id": "d", "expires_at": NaN, "key_id": "k"}'),
    _token(b'{"device_id": "d", "expires_at": 1e999, "key_id": "k"}'),
    _token(b"\xff\xfe"),
    _token(b"null"),
    "....",
    "a.b.c",
]


async def test_hostile_device_tokens_are_401_at_the_fallback(tmp_path) -> None:
    signer = Signer.generate()
    pkg = make_package(tmp_path / "pkg", variant="cloud", signer=signer)
    settings = FallbackSettings(
        packages=[pkg.directory], trusted_keys=[signer.public_key_hex], device_tokens=True
    )
    async with TestClient(TestServer(await build_fallback_app(settings))) as client:
        for token in HOSTILE:
            headers = {"Authorization": f"Bearer {token}"}
            resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1), headers=headers)
            assert resp.status == 401, (token[:40], await resp.text())
            assert "error" in json.loads(await resp.text())


async def test_hostile_device_tokens_are_401_at_the_artifact_route(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        for token in HOSTILE:
            headers = {"Authorization": f"Bearer {token}"}
            async with s.get(f"{cp.url}/api/artifacts/{'0' * 64}", headers=headers) as resp:
                assert resp.status == 401, (token[:40], await resp.text())
